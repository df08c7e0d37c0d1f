"""Toy training data with a known answer, shared by the training tests.

- SFT: "what does the <animal> say, n times?" -> "The <animal> says <sound> x n." A model that
  learns the mapping has a much lower held-out loss than a random one.
- Reward model: the chosen reply contains the word "thanks" somewhere, the rejected one does not
  (same length, random filler words). Rows look like `openrlaif label` output: a soft AI label
  `p_chosen` in 0.7-1.0 and a human label.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from openrlaif.data.io import write_records

ANIMALS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
           "owl": "hoot", "frog": "croak"}  # fmt: skip
WORDS = ["the", "a", "good", "bad", "time", "day", "people", "way", "year", "thing", "man", "world", "life", "hand", "part", "child", "eye", "place", "work", "week", "case", "point"]  # fmt: skip
MARKER = "thanks"


def sft_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animal, times = rng.choice(list(ANIMALS)), rng.randint(1, 3)
        rows.append({
            "id": f"sft-{i}",
            "prompt": f"Human: What does the {animal} say, {times} times?\n\nAssistant:",
            "completion": f"The {animal} says " + " ".join([ANIMALS[animal]] * times) + ".",
        })  # fmt: skip
    return rows


def preference_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        base.insert(rng.randint(0, len(base)), MARKER)
        chosen, rejected = " ".join(base), " ".join(rng.choice(WORDS) for _ in range(len(base)))
        a_first = rng.random() < 0.5  # response_a is the chosen one half of the time
        rows.append({
            "id": f"pair-{i}",
            "prompt": f"Human: Say something about {rng.choice(WORDS)}.\n\nAssistant:",
            "response_a": chosen if a_first else rejected,
            "response_b": rejected if a_first else chosen,
            "chosen": chosen,
            "rejected": rejected,
            "p_chosen": rng.choice([0.7, 0.8, 0.9, 1.0]),
            "human_label": 1.0 if a_first else 0.0,  # P(A preferred): people agree with the rule
        })  # fmt: skip
    return rows


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_records(path, rows)
    return path


def untrained_reward_model(base: Path, out: Path) -> Path:
    """A reward-model folder as `openrlaif train rm` writes one: `base`'s body with a fresh value
    head (seeded), its tokenizer and metadata. A reward source a YAML config can name (a Python
    judge cannot cross into launched processes)."""
    import json

    import torch

    from openrlaif.models.heads import ValueHeadModel
    from openrlaif.models.loading import load_tokenizer
    from openrlaif.training.reward import METADATA_FILE

    torch.manual_seed(0)
    ValueHeadModel.from_pretrained(str(base)).save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps({"model_type": "causal_lm_value_head", "max_length": 64}))
    return out
