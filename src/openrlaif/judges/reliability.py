"""How reliable a pairwise judgment is, one pair at a time: agreement with a human label, the
slot the labeler picks in each order (position bias), whether it prefers the longer response.
`openrlaif align` (labeling/alignment.py) averages them over a dataset; RL's judge diagnostics
(training/rl/diagnostics.py) over each step's comparisons."""

from __future__ import annotations


def argmax_agreement(p_a: float, human: float) -> float:
    """1 if the AI's argmax matches the human choice, 0 if not, 0.5 when the AI is exactly 50/50."""
    if p_a == 0.5:
        return 0.5
    return float((p_a > 0.5) == (human > 0.5))


def preferred_slot(p_first: float) -> int | None:
    """Which slot (1 or 2) the labeler's argmax picks in one order; None at exactly 0.5."""
    if p_first > 0.5:
        return 1
    if p_first < 0.5:
        return 2
    return None


def same_position_preferred(p_a_ab: float, p_a_ba: float) -> bool:
    """True when the labeler picks the same *slot* in both orders (so its choice of response flipped).

    In order (A,B) slot 1 holds A, so P(slot 1) = p_a_ab; in order (B,A) slot 1 holds B, so
    P(slot 1) = 1 - p_a_ba.
    """
    slot_ab, slot_ba = preferred_slot(p_a_ab), preferred_slot(1.0 - p_a_ba)
    return slot_ab is not None and slot_ab == slot_ba


def prefers_longer(p_a: float, len_a: int, len_b: int) -> float | None:
    """1 if the argmax picks the longer response, 0 if the shorter, 0.5 if 50/50; None if equal length."""
    if len_a == len_b:
        return None
    if p_a == 0.5:
        return 0.5
    return float((p_a > 0.5) == (len_a > len_b))
