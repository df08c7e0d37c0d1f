"""The Judge protocol: one interface, four backends (hf, openai, embedding, ensemble).

A backend implements two batched primitives on *ordered* inputs:

- `judge_orders([(prompt, first, second), ...])` -> P(the response shown first is preferred)
- `score_responses([(prompt, response), ...])` -> a direct score in [-1, 1]

This base class adds what every backend shares: the cache (each ordered judgment is cached on
its own, so (A,B) and (B,A) are separate entries), de-duplication, and the paper's position-bias
mitigation: `compare` judges both orders and averages P(A preferred) over them.

A judgment can be *undecided*: the judge could not read its labels (an HTTP judge whose server
returned neither label and ignores logit_bias). It carries the reason and NaN, is never cached,
and only a caller that says it can count such judgments gets one (`undecided_ok`: the labeling
jobs, which list them beside their output); anywhere else it stops the job in one line.

The public methods take any prompt, text or a conversation; a backend sees it as text, the context
of its rating prompt (`data/chat.py`'s `prompt_text`: a conversation as an HH-RLHF dialogue).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openrlaif.data.chat import prompt_text
from openrlaif.data.records import JudgeIdentity, Prompt
from openrlaif.errors import JudgeError
from openrlaif.judges.cache import JudgmentCache, judgment_key

ROUNDING = 1e-9  # a value computed in floating point may pass its bound by this much


def _out_of_range(
    name: str, value: float | None, low: float = -math.inf, high: float = math.inf
) -> str | None:
    """Why `value` cannot be a judgment's `name` (not a finite number in [low, high]), or None."""
    if value is None or (math.isfinite(value) and low - ROUNDING <= value <= high + ROUNDING):
        return None
    bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{name} = {value}, not a finite number{bounds}"


@dataclass(frozen=True)
class OrderedPair:
    prompt: str
    first: str
    second: str


@dataclass
class OrderJudgment:
    """One judgment of one presentation order."""

    p_first: float  # P(the response shown as "Response 1" is preferred)
    rationales: list[str] = field(default_factory=list)  # chain of thought, one per sample
    cached: bool = False
    undecided: str | None = None  # why the labels could not be read (p_first is NaN then)

    @classmethod
    def unreadable(cls, reason: str) -> OrderJudgment:
        return cls(p_first=math.nan, undecided=reason)

    def problem(self) -> str | None:
        return None if self.undecided else _out_of_range("P(first preferred)", self.p_first, 0.0, 1.0)

    def to_cache(self) -> dict[str, Any]:
        return {"p_first": self.p_first, "rationales": self.rationales}

    @classmethod
    def from_cache(cls, d: dict[str, Any]) -> OrderJudgment:
        return cls(p_first=float(d["p_first"]), rationales=list(d.get("rationales", [])), cached=True)


@dataclass
class ScoreJudgment:
    score: float  # in [-1, 1]
    expected: float | None = None  # probability-weighted 1-10 score, when the judge reads tokens
    cached: bool = False
    undecided: str | None = None  # why the score tokens could not be read (score is NaN then)

    @classmethod
    def unreadable(cls, reason: str) -> ScoreJudgment:
        return cls(score=math.nan, undecided=reason)

    def problem(self) -> str | None:
        if self.undecided:
            return None
        return _out_of_range("score", self.score, -1.0, 1.0) or _out_of_range("expected score", self.expected)

    def to_cache(self) -> dict[str, Any]:
        return {"score": self.score, "expected": self.expected}

    @classmethod
    def from_cache(cls, d: dict[str, Any]) -> ScoreJudgment:
        return cls(score=float(d["score"]), expected=d.get("expected"), cached=True)


@dataclass
class Comparison:
    """Both orders of one pair. `p_a` is the order-averaged soft label P(A preferred)."""

    p_a: float
    p_a_ab: float  # A shown as Response 1
    p_a_ba: float  # A shown as Response 2
    rationale_ab: str | None = None
    rationale_ba: str | None = None
    cached: bool = False  # both orders came from the cache
    undecided: str | None = None  # why an order's labels could not be read (the p's are NaN then)


def average_orders(ab: OrderJudgment, ba: OrderJudgment) -> Comparison:
    """Position-bias mitigation: average P(A preferred) over (A,B) and (B,A). Undecided when
    either order is."""
    p_a_ab = ab.p_first
    p_a_ba = 1.0 - ba.p_first
    undecided = [f"order {name}: {j.undecided}" for name, j in (("AB", ab), ("BA", ba)) if j.undecided]
    return Comparison(
        p_a=(p_a_ab + p_a_ba) / 2.0,
        p_a_ab=p_a_ab,
        p_a_ba=p_a_ba,
        rationale_ab=_join_rationales(ab.rationales),
        rationale_ba=_join_rationales(ba.rationales),
        cached=ab.cached and ba.cached,
        undecided="; ".join(undecided) or None,
    )


def _join_rationales(rationales: list[str]) -> str | None:
    if not rationales:
        return None
    if len(rationales) == 1:
        return rationales[0]
    return "\n\n".join(f"[{i + 1}] {r}" for i, r in enumerate(rationales))


def two_way_softmax(logp_1: float, logp_2: float) -> float:
    """P(label 1) from the log-probabilities of labels 1 and 2 (softmax over the two)."""
    import math

    m = max(logp_1, logp_2)
    e1, e2 = math.exp(logp_1 - m), math.exp(logp_2 - m)
    return e1 / (e1 + e2)


def expected_score_to_unit(expected: float, low: float = 1.0, high: float = 10.0) -> float:
    """Rescale a 1-10 expected score linearly to [-1, 1] (d-RLAIF)."""
    return 2.0 * (expected - low) / (high - low) - 1.0


class Judge(ABC):
    backend: ClassVar[str]

    def __init__(self) -> None:
        self.cache: JudgmentCache | None = None

    # ------------------------------------------------------------ identity

    @property
    @abstractmethod
    def model_name(self) -> str: ...

    @abstractmethod
    def fingerprint(self, kind: str) -> dict[str, Any]:
        """Everything that changes this judge's answers for `kind` ('pair' or 'score')."""

    def template_hash(self, kind: str) -> str:
        import hashlib

        canonical = json.dumps(self.fingerprint(kind), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]

    def runs_on(self) -> list[str]:
        """Where this judge's models run, one line each (`models.precision`: device, precision and
        why, threads), for a job to print at its start; empty for a judge that asks a server."""
        return []

    def identity(self, kind: str = "pair") -> JudgeIdentity:
        return JudgeIdentity(
            backend=self.backend, model=self.model_name, template_hash=self.template_hash(kind)
        )

    # ------------------------------------------------------------ backend primitives (uncached)

    @abstractmethod
    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]: ...

    @abstractmethod
    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]: ...

    # ------------------------------------------------------------ cached, de-duplicated

    def orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        return self._cached("pair", [(i.prompt, i.first, i.second) for i in items],
                            lambda todo: self.judge_orders([OrderedPair(*t) for t in todo]),
                            OrderJudgment.from_cache)  # fmt: skip

    def scores(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        return self._cached("score", [tuple(i) for i in items],
                            lambda todo: self.score_responses(todo), ScoreJudgment.from_cache)  # fmt: skip

    def _cached(self, kind: str, texts: list[tuple[str, ...]], run: Any, from_cache: Any) -> list[Any]:
        fingerprint = self.fingerprint(kind)
        keys = [judgment_key(fingerprint, kind, t) for t in texts]
        found = self.cache.get_many(keys) if self.cache is not None else {}
        results: dict[str, Any] = {k: from_cache(v) for k, v in found.items()}
        todo_keys = list(dict.fromkeys(k for k in keys if k not in results))  # each miss once
        if todo_keys:
            first_text = {k: t for k, t in zip(keys, texts, strict=True)}
            fresh = run([first_text[k] for k in todo_keys])
            self._check(fresh)
            new = dict(zip(todo_keys, fresh, strict=True))
            if self.cache is not None:  # an undecided judgment is asked again next time
                self.cache.put_many(
                    {k: v.to_cache() for k, v in new.items() if not v.undecided},
                    kind,
                    json.dumps(self.identity(kind).to_dict()),
                )
            results.update(new)
        if self.cache is not None:
            self.cache.hits += sum(k in found for k in keys)
            self.cache.misses += len(todo_keys)
        return [results[k] for k in keys]

    def _check(self, judged: Sequence[OrderJudgment | ScoreJudgment]) -> None:
        """The last gate before the cache and the output files: a NaN or out-of-range judgment
        (a broken model or server) stops the job instead of becoming a label."""
        for judgment in judged:
            problem = judgment.problem()
            if problem is not None:
                raise JudgeError(
                    f"{self.backend} judge {self.model_name!r} gave {problem}; nothing of this batch was "
                    "written or cached"
                )

    # ------------------------------------------------------------ public API

    def compare_many(
        self, pairs: Sequence[tuple[Prompt, str, str]], undecided_ok: bool = False
    ) -> list[Comparison]:
        """P(A preferred) for each (prompt, A, B), judged in both orders and averaged. An undecided
        comparison is returned only with `undecided_ok`; otherwise it is a JudgeError."""
        ordered: list[OrderedPair] = []
        for prompt, a, b in pairs:
            text = prompt_text(prompt)
            ordered += [OrderedPair(text, a, b), OrderedPair(text, b, a)]
        judged = self.orders(ordered)
        compared = [average_orders(judged[2 * i], judged[2 * i + 1]) for i in range(len(pairs))]
        return compared if undecided_ok else self._decided(compared, "pairs")

    def compare(self, prompt: Prompt, a: str, b: str) -> Comparison:
        return self.compare_many([(prompt, a, b)])[0]

    def score_many(
        self, items: Sequence[tuple[Prompt, str]], undecided_ok: bool = False
    ) -> list[ScoreJudgment]:
        """Direct scores; an undecided one only with `undecided_ok` (see `compare_many`)."""
        scored = self.scores([(prompt_text(prompt), response) for prompt, response in items])
        return scored if undecided_ok else self._decided(scored, "responses")

    def _decided(self, judged: list[Any], what: str) -> list[Any]:
        undecided = [j.undecided for j in judged if j.undecided]
        if undecided:
            raise JudgeError(
                f"{self.backend} judge {self.model_name!r} could not read its labels for {len(undecided)} of "
                f"{len(judged)} {what} (first: {undecided[0]}); this step cannot leave them out (only the "
                "labeling jobs list undecided rows apart)"
            )
        return judged

    def score(self, prompt: Prompt, response: str) -> float:
        """d-RLAIF: a direct score of one response in [-1, 1]."""
        return self.score_many([(prompt, response)])[0].score

    def close(self) -> None:  # noqa: B027 - optional hook, most judges hold nothing
        """Release what the judge holds (HTTP connections, model memory)."""
