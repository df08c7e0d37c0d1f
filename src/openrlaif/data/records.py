"""Typed records that flow between stages.

Every record is a plain dataclass with a `to_dict()` that writes only JSON types, so files
are ordinary JSONL/Parquet that other tools (pandas, `datasets`, TRL) read as they are.
Parsing from raw dicts lives in `data/io.py`, where file and line are known for errors.

A prompt is text (plain, or an HH-RLHF dialogue) or a `Conversation` (TRL's conversational
format: a list of {"role", "content"} messages). A response is always its text; a record whose
prompt is a conversation writes each response as TRL does, a list of one assistant message, so
a file keeps the format it was read in. `data/chat.py` is where either kind of prompt is rendered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


# A tuple of frozen messages, so that a prompt is hashable (prompts key caches and de-duplication)
Conversation = tuple[Message, ...]
Prompt = str | Conversation

MessagesJSON = list[dict[str, str]]


def prompt_json(prompt: Prompt) -> str | MessagesJSON:
    """A prompt as a file holds it: the text, or the list of {"role", "content"} messages."""
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.content} for m in prompt]


def response_json(prompt: Prompt, response: str) -> str | MessagesJSON:
    """A response as a file holds it: text beside a text prompt, a list of one assistant message
    beside a conversation (TRL's conversational prompt/completion and preference formats)."""
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


def prompt_from_json(value: str | MessagesJSON) -> Prompt:
    """`prompt_json` undone, for a row already checked by `data/io.py` (`read_prompt`)."""
    return value if isinstance(value, str) else tuple(Message(m["role"], m["content"]) for m in value)


def response_from_json(value: str | MessagesJSON) -> str:
    """`response_json` undone, for a row already checked by `data/io.py` (`read_response`)."""
    return value if isinstance(value, str) else value[0]["content"]


def record_row(record: Any, responses: tuple[str, ...] = ()) -> dict[str, Any]:
    """`asdict(record)` with its prompt and `responses` fields as a file holds them."""
    d = asdict(record)
    d["prompt"] = prompt_json(record.prompt)
    for key in responses:
        d[key] = response_json(record.prompt, getattr(record, key))
    return d


@dataclass
class PromptRecord:
    id: str
    prompt: Prompt

    def to_dict(self) -> dict[str, Any]:
        return record_row(self)


@dataclass
class ResponseRecord:
    """One response to one prompt (input of `openrlaif score`)."""

    id: str
    prompt: Prompt
    response: str

    def to_dict(self) -> dict[str, Any]:
        return record_row(self, ("response",))


@dataclass
class Pair:
    """Two responses to one prompt.

    `human_label` is P(A preferred) according to people (1.0, 0.0, 0.5 for a tie) when known.
    """

    id: str
    prompt: Prompt
    response_a: str
    response_b: str
    human_label: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return record_row(self, ("response_a", "response_b"))


@dataclass
class JudgeIdentity:
    """Who gave a judgment: enough to tell two labelers apart in any output file."""

    backend: str
    model: str
    template_hash: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class LabeledPair:
    """A pair with its AI preference label.

    `p_a` is P(A preferred) averaged over both presentation orders; `p_a_ab` is P(A preferred)
    when A was shown as "Response 1", `p_a_ba` when A was shown as "Response 2".
    `chosen`/`rejected`/`p_chosen` repeat the label in the standard preference format, so the
    file loads with `datasets` as prompt/chosen/rejected plus a soft label.
    """

    id: str
    prompt: Prompt
    response_a: str
    response_b: str
    p_a: float
    p_a_ab: float
    p_a_ba: float
    judge: JudgeIdentity
    cached: bool = False
    rationale_ab: str | None = None
    rationale_ba: str | None = None
    human_label: float | None = None
    chosen: str = field(init=False)
    rejected: str = field(init=False)
    p_chosen: float = field(init=False)

    def __post_init__(self) -> None:
        a_wins = self.p_a >= 0.5
        self.chosen = self.response_a if a_wins else self.response_b
        self.rejected = self.response_b if a_wins else self.response_a
        self.p_chosen = self.p_a if a_wins else 1.0 - self.p_a

    def to_dict(self) -> dict[str, Any]:
        return record_row(self, ("response_a", "response_b", "chosen", "rejected"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabeledPair:
        """A labeled row checked by `data/io.py`'s `check_labeled_row`."""
        # derived columns (chosen/rejected/p_chosen) and extra ones (a human label import's
        # `ai_p_a`, `label_source`) are not fields of the record
        names = {f.name for f in fields(cls) if f.init} - {"judge", "prompt", "response_a", "response_b"}
        keep = {k: v for k, v in d.items() if k in names}
        return cls(
            prompt=prompt_from_json(d["prompt"]),
            response_a=response_from_json(d["response_a"]),
            response_b=response_from_json(d["response_b"]),
            judge=JudgeIdentity(**d["judge"]),
            **keep,
        )


@dataclass
class ScoredResponse:
    """A response with a direct (d-RLAIF) score.

    `score` is in [-1, 1]; `expected_score` is the probability-weighted 1-10 score when the
    judge reads score-token probabilities (None for judges that do not).
    """

    id: str
    prompt: Prompt
    response: str
    score: float
    judge: JudgeIdentity
    expected_score: float | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return record_row(self, ("response",))
