"""The judge options that label, align, score and eval share, and the judge they open."""

from __future__ import annotations

import argparse

from openrlaif.judges import Judge
from openrlaif.labeling import open_judge

DEFAULT_JUDGE = "embedding-harmless"


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help=f"shipped judge name or YAML file (default: {DEFAULT_JUDGE}; list: `openrlaif judges`)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="SQLite judgment cache (default: $OPENRLAIF_CACHE or ~/.cache/openrlaif/judgments.sqlite3)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the judgment cache")
    p.add_argument(
        "--chunk-size", type=int, default=64, help="rows judged and written per step (default: 64)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def open_judge_from_args(args: argparse.Namespace, judge: str | None = None) -> Judge:
    """`judge` (default: --judge) with the --cache / --no-cache options."""
    return open_judge(judge or args.judge, args.cache, args.no_cache)
