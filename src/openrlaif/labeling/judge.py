"""Opening a judge for a labeling job: by name or YAML file, with its judgment cache; and the
request counters of the HTTP servers it used."""

from __future__ import annotations

from typing import Any

from openrlaif.judges import Judge, JudgmentCache, build_judge, load_judge_config
from openrlaif.judges.cache import default_cache_path


def open_judge(judge: str, cache: str | None = None, no_cache: bool = False) -> Judge:
    """A shipped judge by name (`openrlaif judges`) or a YAML file, reading and writing the SQLite
    judgment cache `cache` (default: $OPENRLAIF_CACHE or ~/.cache/openrlaif/judgments.sqlite3)
    unless `no_cache`. Close it when done."""
    config = load_judge_config(judge)
    judgment_cache = None if no_cache else JudgmentCache(cache or default_cache_path())
    return build_judge(config, judgment_cache)


READINGS = {
    "biased_reads": "with logit_bias",
    "widened_reads": "with fallback_top_logprobs",
    "bounded_reads": "bounded by the last returned token",
    "undecided": "undecided",
}  # an HTTP judge's `stats()` counters of labels read beyond the top tokens, and how each is shown


def reading_stats(judge: Judge) -> dict[str, int]:
    """How many judgments needed more than the top tokens to read their labels (`READINGS`),
    summed over an ensemble's HTTP members; empty for judges that read every label directly."""
    totals: dict[str, int] = {}
    for member in [judge, *getattr(judge, "members", [])]:
        if hasattr(member, "stats"):
            stats = member.stats()
            for key in READINGS:
                totals[key] = totals.get(key, 0) + int(stats.get(key, 0))
    return totals


def server_stats(judge: Judge) -> list[tuple[str, dict[str, Any]]]:
    """(server URL, {requests, retries, failures}) for each server an HTTP judge used, an
    ensemble's members included; empty for local judges."""
    rows = []
    for member in [judge, *getattr(judge, "members", [])]:
        if hasattr(member, "stats"):
            rows += list(member.stats()["servers"].items())
    return rows
