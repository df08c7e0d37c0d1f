"""Ensemble judge: a weighted average of several judges' soft labels (and scores).

Each member keeps its own cache entries, so adding a member to an ensemble re-uses every
judgment the others already made. Averaging happens per presentation order, so the ensemble's
per-order detail (and its position bias) is the weighted mix of its members'. A judgment that one
member left undecided is undecided for the ensemble (a mix of the others would be another judge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from openrlaif.config import EnsembleJudgeConfig
from openrlaif.judges.base import Judge, OrderedPair, OrderJudgment, ScoreJudgment


def _undecided(members: Sequence[Judge], judged: Sequence[OrderJudgment | ScoreJudgment]) -> str | None:
    reasons = [f"{m.model_name}: {j.undecided}" for m, j in zip(members, judged, strict=True) if j.undecided]
    return "; ".join(reasons) or None


class EnsembleJudge(Judge):
    backend = "ensemble"

    def __init__(self, config: EnsembleJudgeConfig, members: Sequence[Judge]) -> None:
        super().__init__()
        self.config = config
        self.members = list(members)
        raw = config.weights or [1.0] * len(self.members)
        total = sum(raw)
        self.weights = [w / total for w in raw]

    @property
    def model_name(self) -> str:
        return "+".join(m.model_name for m in self.members)

    def runs_on(self) -> list[str]:
        return [line for m in self.members for line in m.runs_on()]

    def fingerprint(self, kind: str) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "members": [m.fingerprint(kind) for m in self.members],
            "weights": self.weights,
        }

    # Members are called through their cached methods; the ensemble result is cheap to recompute,
    # so `orders`/`scores` bypass the ensemble-level cache (no double storage).
    def orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        return self.judge_orders(items)

    def scores(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        return self.score_responses(items)

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        per_member = [m.orders(items) for m in self.members]
        out = []
        for i in range(len(items)):
            judged = [results[i] for results in per_member]
            undecided = _undecided(self.members, judged)
            if undecided:
                out.append(OrderJudgment.unreadable(undecided))
                continue
            rationales = [r for j in judged for r in j.rationales]
            out.append(OrderJudgment(
                p_first=sum(w * j.p_first for w, j in zip(self.weights, judged, strict=True)),
                rationales=rationales,
                cached=all(j.cached for j in judged),
            ))  # fmt: skip
        return out

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        per_member = [m.scores(items) for m in self.members]
        out = []
        for i in range(len(items)):
            judged = [results[i] for results in per_member]
            undecided = _undecided(self.members, judged)
            if undecided:
                out.append(ScoreJudgment.unreadable(undecided))
                continue
            expected = [j.expected for j in judged if j.expected is not None]
            out.append(ScoreJudgment(
                score=sum(w * j.score for w, j in zip(self.weights, judged, strict=True)),
                expected=sum(w * e for w, e in zip(self.weights, expected, strict=True)) if len(expected) == len(judged) else None,
                cached=all(j.cached for j in judged),
            ))  # fmt: skip
        return out

    def close(self) -> None:
        for m in self.members:
            m.close()
