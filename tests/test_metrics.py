"""Soft-label maths, order averaging and the alignment metrics, against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from openrlaif.data.records import JudgeIdentity, LabeledPair
from openrlaif.judges.base import OrderJudgment, average_orders, expected_score_to_unit, two_way_softmax
from openrlaif.labeling import (
    alignment_metrics,
    bootstrap_ci,
    expected_calibration_error,
    prefers_longer,
    same_position_preferred,
)

ID = JudgeIdentity("scripted", "m", "h")


def test_two_way_softmax_matches_hand_values() -> None:
    # log P(1) = log 0.3, log P(2) = log 0.1 -> P(1 | {1,2}) = 0.3 / 0.4 = 0.75
    assert two_way_softmax(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert two_way_softmax(-1000.0, -1000.0) == pytest.approx(0.5)  # no underflow
    assert two_way_softmax(0.0, -math.inf) == pytest.approx(1.0)


def test_average_orders() -> None:
    # (A,B): P(first=A) = 0.8 ; (B,A): P(first=B) = 0.6 -> P(A) in that order = 0.4
    c = average_orders(OrderJudgment(0.8, ["r1"]), OrderJudgment(0.6))
    assert c.p_a_ab == pytest.approx(0.8)
    assert c.p_a_ba == pytest.approx(0.4)
    assert c.p_a == pytest.approx(0.6)
    assert c.rationale_ab == "r1" and c.rationale_ba is None


def test_expected_score_rescaling() -> None:
    assert expected_score_to_unit(1.0) == -1.0
    assert expected_score_to_unit(10.0) == 1.0
    assert expected_score_to_unit(5.5) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("p_a_ab", "p_a_ba", "same"),
    [
        (0.9, 0.1, True),  # picks slot 1 both times (A first, then B first): position bias
        (0.1, 0.9, True),  # picks slot 2 both times
        (0.9, 0.8, False),  # picks A both times: consistent
        (0.2, 0.3, False),  # picks B both times: consistent
        (0.5, 0.1, False),  # undecided in one order: not counted as same position
    ],
)
def test_same_position_preferred(p_a_ab: float, p_a_ba: float, same: bool) -> None:
    assert same_position_preferred(p_a_ab, p_a_ba) is same


def test_prefers_longer() -> None:
    assert prefers_longer(0.9, 10, 5) == 1.0
    assert prefers_longer(0.9, 5, 10) == 0.0
    assert prefers_longer(0.5, 5, 10) == 0.5
    assert prefers_longer(0.9, 5, 5) is None


def test_ece_hand_computed() -> None:
    # Two pairs in the 0.9-1.0 bin: confidences 0.95 and 0.95, one right one wrong -> |0.5-0.95| = 0.45
    # Two pairs in the 0.5-0.55 bin: conf 0.52, 0.52, both right -> |1 - 0.52| = 0.48
    ece = expected_calibration_error([0.95, 0.05, 0.52, 0.48], [1.0, 1.0, 1.0, 0.0])
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.48)


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    values = [1.0] * 70 + [0.0] * 30
    low, high = bootstrap_ci(values, seed=0)
    assert low < 0.7 < high
    assert (low, high) == bootstrap_ci(values, seed=0)
    assert low > 0.6 and high < 0.8  # sd of the mean is ~0.046
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def _pair(i: int, p_a_ab: float, p_a_ba: float, human: float, a: str = "aa", b: str = "b") -> LabeledPair:
    return LabeledPair(
        id=str(i), prompt="q", response_a=a, response_b=b, p_a=(p_a_ab + p_a_ba) / 2,
        p_a_ab=p_a_ab, p_a_ba=p_a_ba, judge=ID, human_label=human,
    )  # fmt: skip


def test_alignment_metrics_hand_computed() -> None:
    labeled = [
        _pair(0, 0.9, 0.7, 1.0),  # p_a 0.8 -> A, human A: right; consistent
        _pair(1, 0.9, 0.1, 1.0),  # p_a 0.5 -> tie: 0.5; same position (slot 1 twice)
        _pair(2, 0.2, 0.4, 1.0),  # p_a 0.3 -> B, human A: wrong
        _pair(3, 0.1, 0.3, 0.0),  # p_a 0.2 -> B, human B: right
    ]
    m = alignment_metrics(labeled)
    assert m["pairs"] == 4
    assert m["alignment"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["same_position_preferred"] == pytest.approx(1 / 4)
    # A ("aa") is longer everywhere: AI picks longer in pair 0, tie in 1, shorter in 2 and 3
    assert m["p_prefers_longer"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert m["human_p_prefers_longer"] == pytest.approx(3 / 4)
    # P(slot 1): orders AB give p_a_ab, orders BA give 1 - p_a_ba
    slot1 = [0.9, 0.9, 0.2, 0.1, 0.3, 0.9, 0.6, 0.7]
    assert m["mean_p_first_slot"] == pytest.approx(sum(slot1) / 8)
    assert m["alignment_ci95"][0] <= m["alignment"] <= m["alignment_ci95"][1]
    for name in ("same_position_preferred", "mean_p_first_slot", "p_prefers_longer"):  # bootstrap over pairs
        low, high = m[f"{name}_ci95"]
        assert 0.0 <= low <= m[name] <= high <= 1.0 and high > low, name
    assert m["same_position_preferred_ci95"][1] <= 1.0 and m["same_position_preferred_ci95"][0] == 0.0


def test_labeled_pair_standard_format() -> None:
    x = _pair(0, 0.2, 0.4, 1.0, a="first", b="second")
    assert x.chosen == "second" and x.rejected == "first"
    assert x.p_chosen == pytest.approx(0.7)
    again = LabeledPair.from_dict(x.to_dict())
    assert again == x
