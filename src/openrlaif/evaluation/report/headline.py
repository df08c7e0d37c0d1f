"""The headline numbers of a run, as rows: the same rows in the HTML report and the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openrlaif.evaluation.report.load import Comparison, RunData
from openrlaif.evaluation.report.reward_model import RewardModelCheck, reward_model_checks
from openrlaif.evaluation.report.text import chars, ci_text, finite, lookup, pct


@dataclass
class Measure:
    """One row of the headline table (the same rows in the HTML report and the terminal)."""

    group: str  # "rlaif vs sft", "labeler vs humans"
    name: str
    value: str
    ci: str
    detail: str
    lead: bool = False  # one of the numbers the report leads with (bold)


def _comparison_measures(c: Comparison) -> list[Measure]:
    s, group = c.summary, f"{c.a} vs {c.b}"
    wr, lc = s.get("win_rate") or {}, s.get("length_controlled_win_rate") or {}
    counts = " / ".join(str(wr.get(k, "—")) for k in ("wins", "ties", "losses"))
    coef = finite(lc.get("coef_log_length_ratio"))
    rows = [
        Measure(group, "win rate", pct(wr.get("value")), ci_text(wr.get("ci95")),
                f"wins / ties / losses {counts} of {wr.get('n', '—')}", lead=True),
        Measure(group, "length-controlled win rate", pct(lc.get("value")), ci_text(lc.get("ci95")),
                "at equal length" + (f"; length coefficient {coef:+.2f}" if coef is not None else ""), lead=True),
    ]  # fmt: skip
    if harmless := s.get("harmless_rate"):
        threshold = finite(lookup(harmless, "threshold"))
        rows.append(Measure(
            group, "harmless rate", f"{pct(lookup(harmless, 'b', 'value'))} → {pct(lookup(harmless, 'a', 'value'))}",
            f"{ci_text(lookup(harmless, 'b', 'ci95'))} → {ci_text(lookup(harmless, 'a', 'ci95'))}",
            f"{c.b} → {c.a}" + (f"; judge score above {threshold:g}" if threshold is not None else ""), lead=True,
        ))  # fmt: skip
    if length := s.get("length"):
        rows.append(Measure(
            group, "mean length (chars)",
            f"{chars(lookup(length, 'b', 'mean_chars'))} → {chars(lookup(length, 'a', 'mean_chars'))}",
            f"median {chars(lookup(length, 'b', 'median_chars'))} → {chars(lookup(length, 'a', 'median_chars'))}",
            f"{c.b} → {c.a}", lead=True,
        ))  # fmt: skip
    if distinct := s.get("distinct_responses"):
        rows.append(Measure(
            group, "distinct responses", f"{pct(lookup(distinct, 'b'))} → {pct(lookup(distinct, 'a'))}", "",
            f"{c.b} → {c.a}; share of prompts with an answer of their own (low: collapsed onto one answer)",
        ))  # fmt: skip
    if finite(s.get("order_agreement")) is not None:
        rows.append(Measure(group, "judge order agreement", pct(s["order_agreement"]), "",
                            "the same winner with the responses in either order"))  # fmt: skip
    return rows


def _align_measures(a: dict[str, Any]) -> list[Measure]:
    group = "labeler vs humans"
    return [
        Measure(group, "alignment", pct(a.get("alignment")), ci_text(a.get("alignment_ci95")),
                f"{a.get('pairs_with_human_label', '—')} human-labeled pairs of {a.get('dataset', 'the data')}",
                lead=True),
        Measure(group, "position bias", pct(a.get("same_position_preferred")), "",
                f"same slot preferred in both orders; mean P(first slot) {pct(a.get('mean_p_first_slot'))}"),
        Measure(group, "length bias", pct(a.get("p_prefers_longer")), "",
                f"P(prefers the longer response); humans {pct(a.get('human_p_prefers_longer'))}"),
    ]  # fmt: skip


def _reward_model_measures(check: RewardModelCheck) -> list[Measure]:
    before = f"; before training {pct(check.before)}" if check.before is not None else ""
    verdict_ = "learned" if check.learned else "did not learn (CI includes 50%)"
    return [
        Measure(f"reward model {check.folder}/", "held-out accuracy", pct(check.accuracy),
                ci_text(check.ci95), f"vs the AI labels of {check.pairs} pairs of held-out prompts{before}; {verdict_}", lead=True),
    ]  # fmt: skip


def headline_measures(run: RunData) -> list[Measure]:
    """Every comparison's rows, then each reward model's check, then the labeler's alignment."""
    rows = [m for c in run.comparisons for m in _comparison_measures(c)]
    rows += [m for check in reward_model_checks(run) for m in _reward_model_measures(check)]
    return rows + (_align_measures(run.align) if run.align else [])
