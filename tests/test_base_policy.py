"""The shipped base policy `builtin:hh-tiny-gpt` (made by scripts/train_base_policy.py): it loads by
name, stays small, its tokenizer is lossless, it learned the held-out dialogues, and it samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from openrlaif.data.chat import completion_text
from openrlaif.data.datasets import HH_HARMLESS_TRAIN_LINES, hh_harmless_split
from openrlaif.errors import ConfigError
from openrlaif.models.loading import load_pretrained, load_tokenizer
from openrlaif.models.names import resolve_model_path

NAME = "builtin:hh-tiny-gpt"


@pytest.fixture(scope="module")
def policy() -> tuple[Path, Any, Any]:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(NAME)
    return Path(path), load_tokenizer(path), load_pretrained(AutoModelForCausalLM, path).eval()


def eval_dialogues(n: int) -> list[str]:
    pairs = hh_harmless_split("eval")[:n]
    return [p.prompt + completion_text(p.prompt, p.response_a) for p in pairs]


def test_split_holds_out_the_eval_lines() -> None:
    train, held_out = hh_harmless_split("train"), hh_harmless_split("eval")
    line = lambda p: int(p.id.removeprefix("hh-harmless-"))  # noqa: E731
    assert (len(train), len(held_out)) == (1196, 597)  # 6 unusable lines skipped, 1 prompt seen in train
    assert max(map(line, train)) <= HH_HARMLESS_TRAIN_LINES < min(map(line, held_out))
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}


def test_loads_by_name_and_is_small(policy: tuple[Path, Any, Any]) -> None:
    path, tokenizer, model = policy
    names = {f.name for f in path.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "MODEL_CARD.md",
    }
    assert expected <= names
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) < 20 * 2**20
    assert model.config.model_type == "gpt2" and model.dtype == torch.float32  # fp16 on disk, fp32 loaded
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_unknown_builtin_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="builtin:hh-tiny-gpt"):  # the message lists what is shipped
        resolve_model_path("builtin:no-such-model")


def test_tokenizer_round_trips_a_dialogue(policy: tuple[Path, Any, Any]) -> None:
    _, tokenizer, _ = policy
    text = eval_dialogues(1)[0] + " Émigré façade — 42°C, naïve 😊"  # bytes outside the training text too
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(text) / len(ids) > 2.5  # a trained BPE (3.7 chars/token on this data), not bytes


def mean_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=192)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_held_out_loss_is_far_below_a_random_model(policy: tuple[Path, Any, Any]) -> None:
    from transformers import AutoModelForCausalLM

    _, tokenizer, model = policy
    texts = eval_dialogues(12)  # held out: never seen by the tokenizer or the model
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    trained, untrained = mean_loss(model, tokenizer, texts), mean_loss(random_model, tokenizer, texts)
    assert untrained > 7.5  # about ln(4096) = 8.3
    assert trained < 5.0  # 4.4 measured here; about 5.1 after 50 of the 488 training steps
    assert trained < untrained - 3.0


def test_samples_are_non_empty_text(policy: tuple[Path, Any, Any]) -> None:
    from openrlaif.inference.local import sample

    _, tokenizer, model = policy
    prompts = [p.prompt for p in hh_harmless_split("eval")[:2]]
    got = sample(model, tokenizer, prompts, n=2, temperature=0.9, max_new_tokens=24, seed=0)
    assert len(got) == 4
    assert all(s.response_ids and s.response_text.strip() for s in got)
    assert any(" " in s.response_text for s in got)  # words, not one token
