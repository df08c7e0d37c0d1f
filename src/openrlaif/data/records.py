"""Typed records that flow between stages.

Every record is a plain dataclass with a `to_dict()` that writes only JSON types, so files
are ordinary JSONL/Parquet that other tools (pandas, `datasets`, TRL) read as they are.
Parsing from raw dicts lives in `data/io.py`, where file and line are known for errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class PromptRecord:
    id: str
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ResponseRecord:
    """One response to one prompt (input of `openrlaif score`)."""

    id: str
    prompt: str
    response: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pair:
    """Two responses to one prompt.

    `human_label` is P(A preferred) according to people (1.0, 0.0, 0.5 for a tie) when known.
    """

    id: str
    prompt: str
    response_a: str
    response_b: str
    human_label: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    prompt: str
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
        d = asdict(self)
        d["judge"] = self.judge.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabeledPair:
        # derived columns (chosen/rejected/p_chosen) and extra ones (a human label import's
        # `ai_p_a`, `label_source`) are not fields of the record
        names = {f.name for f in fields(cls) if f.init} - {"judge"}
        keep = {k: v for k, v in d.items() if k in names}
        return cls(judge=JudgeIdentity(**d["judge"]), **keep)


@dataclass
class ScoredResponse:
    """A response with a direct (d-RLAIF) score.

    `score` is in [-1, 1]; `expected_score` is the probability-weighted 1-10 score when the
    judge reads score-token probabilities (None for judges that do not).
    """

    id: str
    prompt: str
    response: str
    score: float
    judge: JudgeIdentity
    expected_score: float | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["judge"] = self.judge.to_dict()
        return d
