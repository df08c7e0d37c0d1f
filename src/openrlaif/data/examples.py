"""Training examples and their row parsers: what the trainers read from JSONL/Parquet files.

- `SFTExample` / `parse_sft_row`: a prompt and its completion (SFT demonstrations; a `response`
  field works in place of `completion`, so a responses file trains as it is; or TRL's
  conversational `messages`, whose last, assistant, message is the completion).
- `PreferenceExample` / `parse_preference_row`: a prompt, a chosen and a rejected response and
  P(chosen is better): the output of `openrlaif label` (a soft AI label, with the human label when
  there), any prompt/chosen/rejected file (p = 1), or pairs with a human label (reward model, DPO).

Each takes text or conversational rows (`data/io.py`: `read_prompt`, `read_response`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openrlaif.data.io import (
    RowError,
    check_label_fields,
    parse_pair,
    probability,
    read_id,
    read_messages,
    read_prompt,
    read_response,
    split_last_reply,
)
from openrlaif.data.records import Prompt, record_row


@dataclass
class SFTExample:
    id: str
    prompt: Prompt
    completion: str

    def to_dict(self) -> dict[str, Any]:
        return record_row(self, ("completion",))


def parse_sft_row(row: dict[str, Any], line: int) -> SFTExample:
    if "messages" in row:  # TRL's conversational language-modeling format
        conversation, completion = split_last_reply(read_messages(row, "messages"), "messages")
        return SFTExample(read_id(row, line), conversation, completion)
    key = "completion" if "completion" in row else "response" if "response" in row else None
    if key is None:
        raise RowError(
            "missing field 'completion' (SFT rows are 'prompt' + 'completion' ('response' also works), or 'messages')"
        )
    prompt = read_prompt(row)
    return SFTExample(read_id(row, line), prompt, read_response(row, key, prompt))


@dataclass
class PreferenceExample:
    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    p: float  # the training label: P(chosen is better)
    human: float | None = None  # P(chosen is better) according to people, when known


def parse_preference_row(row: dict[str, Any], line: int) -> PreferenceExample:
    if "p_chosen" in row and row["p_chosen"] is not None:  # `openrlaif label` output: soft AI label
        check_label_fields(row)
        prompt = read_prompt(row)
        chosen, rejected = read_response(row, "chosen", prompt), read_response(row, "rejected", prompt)
        human = None
        if row.get("human_label") is not None:  # P(A preferred); A may be the rejected one
            human_a = probability(row, "human_label")
            a_is_chosen = row.get("response_a", row["chosen"]) == row["chosen"]  # as the file has them
            human = human_a if a_is_chosen else 1.0 - human_a
        return PreferenceExample(
            read_id(row, line),
            prompt,
            chosen,
            rejected,
            probability(row, "p_chosen"),
            human,
        )
    pair = parse_pair(row, line)  # prompt/chosen/rejected, response_a/b + human label, HH dialogues
    explicit_human = "response_a" in row and pair.human_label is not None
    if pair.human_label is None:
        raise RowError(
            "no label: need 'p_chosen' (from `openrlaif label`), 'human_label'/'preferred', or prompt/chosen/rejected"
        )
    human = pair.human_label if explicit_human else None
    return PreferenceExample(pair.id, pair.prompt, pair.response_a, pair.response_b, pair.human_label, human)
