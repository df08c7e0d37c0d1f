"""The headline verdict of an evaluation, worded once: the terminal (`openrlaif eval`, the run
summary) and the HTML report say the same sentence. It says so plainly when the trained policy did
not win: a 95% CI of the win rate that includes 50% is no win."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openrlaif.evaluation.report.text import ci_text, finite, judge_name, pct, side_name


def ci_tone(ci: Any) -> str:
    """good: the whole 95% CI is above 50%; bad: below; neutral: it includes 50% (or is unknown)."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(finite(c) is not None for c in ci):
        return "good" if ci[0] > 0.5 else "bad" if ci[1] < 0.5 else "neutral"
    return "neutral"


@dataclass(frozen=True)
class Verdict:
    """A win rate in plain words: the outcome, the numbers behind it, and its tone."""

    outcome: str  # "rlaif beats sft: ..."
    numbers: str  # "Win rate 62.5% (95% CI ...) on 200 prompts, as judged by ..."; "" without a win rate
    tone: str  # good, bad or neutral (see ci_tone)

    def __str__(self) -> str:
        return " ".join(part for part in (self.outcome, self.numbers) if part)


def verdict(summary: dict[str, Any]) -> Verdict:
    """The verdict of one evaluation (its eval.json): does the 95% CI of A's win rate exclude 50%?"""
    a, b = side_name(summary, "a"), side_name(summary, "b")
    wr = summary.get("win_rate") or {}
    value, ci, n = finite(wr.get("value")), wr.get("ci95"), wr.get("n")
    tone = ci_tone(ci)
    if value is None:
        return Verdict(f"No win rate was measured for {a} vs {b}.", "", tone)
    outcome = {
        "good": f"{a} beats {b}: the 95% CI of its win rate is above 50%.",
        "bad": f"{a} does not beat {b}: {b} wins (the 95% CI of {a}'s win rate is below 50%).",
        "neutral": f"{a} does not beat {b} clearly: the 95% CI of the win rate includes 50%.",
    }[tone]
    interval = f" (95% CI {pct(ci[0])} to {pct(ci[1])})" if ci is not None and ci_text(ci) else ""
    prompts = f" on {n} prompts" if n else ""
    judge = judge_name(summary.get("judge"))
    return Verdict(outcome, f"Win rate {pct(value)}{interval}{prompts}, as judged by {judge}.", tone)
