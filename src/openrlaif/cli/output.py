"""What several commands print the same way."""

from __future__ import annotations

from typing import Any

from openrlaif.labeling.judge import READINGS


def pct(x: float | None) -> str:
    """0.625 -> "62.5%"; "n/a" for a missing (or NaN) number."""
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def print_server_stats(servers: list[tuple[str, dict[str, Any]]]) -> None:
    """One line per HTTP server used: requests, retries, failures."""
    for url, st in servers:
        print(f"  {url}: {st['requests']} requests, {st['retries']} retries, {st['failures']} failures")


def print_readings(readings: dict[str, int] | None) -> None:
    """When any judgment needed more than the top tokens, how its labels were read
    (labeling/judge.READINGS); nothing otherwise."""
    if readings and any(readings.values()):
        shown = ", ".join(f"{readings[key]} {text}" for key, text in READINGS.items() if readings.get(key))
        print(f"  judgments whose labels were not all among the top tokens: {shown}")
