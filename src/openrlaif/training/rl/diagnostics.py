"""How far the reward source can be trusted, measured while RL trains (every
`judge_diagnostics_every` steps, logged as `judge/*` to the console, metrics.jsonl, TensorBoard
and the report):

- `judge/order_flip_rate`: of the step's pairwise comparisons (`judge_pairwise`), the share whose
  argmax changes with the order the two responses are shown in (the judge picks the same slot
  both times: position bias, DESIGN §2.1);
- `judge/decisiveness`: mean |P - 0.5| of those comparisons (0: coin flips; 0.5: certain);
- `judge/reward_length_corr`: the Pearson correlation of the step's rewards with the responses'
  lengths in tokens (every reward type; a policy that grows long to please the reward shows here);
- `judge/gold_agreement`: with `gold_pairs`, the reward source's agreement with people on those
  pairs (argmax vs the human label; ties count half), re-measured each time so a drifting judge
  (one that is itself trained, as in self-labeling) is seen. With `reward.cache` set, repeats of
  the same judgments are read from the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from openrlaif.data.records import Pair
from openrlaif.judges.base import Comparison
from openrlaif.judges.reliability import argmax_agreement, same_position_preferred


def diagnostics_due(config: Any, step: int) -> bool:
    """Whether step `step` logs the diagnostics (`judge_diagnostics_every`; 0: never)."""
    every = config.judge_diagnostics_every
    return every > 0 and step % every == 0


def comparison_diagnostics(comparisons: Sequence[Comparison]) -> dict[str, float]:
    """Order-flip rate and decisiveness of a step's comparisons (empty: none)."""
    if not comparisons:
        return {}
    flips = [same_position_preferred(c.p_a_ab, c.p_a_ba) for c in comparisons]
    return {
        "judge/order_flip_rate": sum(flips) / len(flips),
        "judge/decisiveness": sum(abs(c.p_a - 0.5) for c in comparisons) / len(comparisons),
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant (no correlation to speak of)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def gold_agreement(prefers: Callable[[list[Pair]], list[float]], gold: Sequence[Pair]) -> float:
    """The share of `gold` pairs (with a human label other than a tie) on which the reward source's
    P(A preferred), from `prefers`, picks the response people picked."""
    labeled = [p for p in gold if p.human_label is not None and p.human_label != 0.5]
    if not labeled:
        return math.nan
    p_a = prefers(labeled)
    return sum(argmax_agreement(p, h.human_label or 0.0) for p, h in zip(p_a, labeled, strict=True)) / len(
        labeled
    )
