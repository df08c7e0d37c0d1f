"""Numbers as text for the report: percentages, intervals, lengths; a missing number is "—"."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> float | None:
    """A finite number, else None (JSON null, NaN from an empty measure, text, booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def pct(value: Any, digits: int = 1) -> str:
    number = finite(value)
    return "—" if number is None or not math.isfinite(number) else f"{number:.{digits}%}"


def ci_text(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or any(finite(c) is None for c in ci):
        return ""
    return f"[{pct(ci[0])}, {pct(ci[1])}]"


def chars(value: Any) -> str:
    number = finite(value)
    return "—" if number is None else f"{number:.0f}"


def lookup(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def judge_name(identity: Any) -> str:
    if isinstance(identity, str):
        return identity
    if not isinstance(identity, dict):
        return "the judge"
    if identity.get("name"):
        return str(identity["name"])
    parts = [str(identity[k]) for k in ("backend", "model") if identity.get(k)]
    return ":".join(parts) or "the judge"


def side_name(summary: dict[str, Any], side: str) -> str:
    """The name of side "a" or "b" of an evaluation summary (eval.json), else "A" / "B"."""
    return str((summary.get(side) or {}).get("name") or side.upper())
