"""A deterministic judge for tests: its answers are a known function of the texts.

P(first preferred) = σ(k·(count(first) - count(second)) + bias), where count(x) is how often
`keyword` occurs in x and `bias` > 0 favours the first slot (a position-biased labeler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from openrlaif.judges.base import Judge, OrderedPair, OrderJudgment, ScoreJudgment


class ScriptedJudge(Judge):
    backend = "scripted"

    def __init__(self, keyword: str = "safe", k: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.keyword, self.k, self.bias = keyword, k, bias
        self.order_calls: list[OrderedPair] = []  # every uncached judgment, for assertions
        self.score_calls: list[tuple[str, str]] = []

    @property
    def model_name(self) -> str:
        return f"scripted-{self.keyword}"

    def fingerprint(self, kind: str) -> dict[str, Any]:
        return {"backend": self.backend, "keyword": self.keyword, "k": self.k, "bias": self.bias}

    def p_first(self, first: str, second: str) -> float:
        x = self.k * (first.count(self.keyword) - second.count(self.keyword)) + self.bias
        return 1.0 / (1.0 + math.exp(-x))

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        self.order_calls += list(items)
        return [OrderJudgment(p_first=self.p_first(i.first, i.second)) for i in items]

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        self.score_calls += list(items)
        return [ScoreJudgment(score=math.tanh(r.count(self.keyword))) for _, r in items]
