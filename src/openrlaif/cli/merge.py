"""`openrlaif merge labels` (the parts of a sharded `label`) and `openrlaif merge cache`."""

from __future__ import annotations

import argparse

from openrlaif.judges.cache import JudgmentCache
from openrlaif.labeling import merge_labeled, print_undecided


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    steps = p.add_subparsers(dest="step", required=True, metavar="WHAT")
    q = steps.add_parser(
        "labels",
        help="join the parts of `label --shard I/N` into one file, checked against the pairs file",
        description="Check that every pair id of --pairs is in exactly one part, that every part "
        "comes from the same judge and holds the shard it claims, then write the parts' rows into "
        "OUT (atomically; nothing is written when a check fails).",
    )
    q.add_argument("out", metavar="OUT", help="merged labeled file (.jsonl or .parquet)")
    q.add_argument(
        "parts", metavar="PART", nargs="+", help="the shards' outputs (`label --shard I/N --out PART`)"
    )
    q.add_argument("--pairs", required=True, help="the pairs file every shard was given")
    q.add_argument(
        "--skip-invalid", action="store_true", help="the shards were run with --skip-invalid: so is --pairs"
    )
    q.set_defaults(handler=cmd_merge_labels)
    q = steps.add_parser(
        "cache",
        help="copy the judgments of other caches into one (per-machine caches, e.g. on NFS)",
        description="Copy into INTO every judgment of each FROM cache that INTO does not hold yet.",
    )
    q.add_argument("into", metavar="INTO", help="the SQLite judgment cache to add to (created if absent)")
    q.add_argument("sources", metavar="FROM", nargs="+", help="judgment caches to copy from (read only)")
    q.set_defaults(handler=cmd_merge_cache)


def cmd_merge_labels(args: argparse.Namespace) -> int:
    result = merge_labeled(args.out, args.parts, args.pairs, skip_invalid=args.skip_invalid)
    split = f"{result.shards}-way split, " if result.shards else ""
    judge = result.judge
    print(
        f"merged {result.parts} part(s) ({split}every pair of {args.pairs} once): {result.rows} rows -> "
        f"{result.out}; judge {judge.get('backend')}/{judge.get('model')}; {result.seconds:.1f}s"
    )
    print_undecided(result.undecided, result.out)
    return 0


def cmd_merge_cache(args: argparse.Namespace) -> int:
    cache = JudgmentCache(args.into)
    try:
        for source in args.sources:
            added = cache.merge_from(source)
            print(f"{source}: {added} judgment(s) added")
        print(f"{args.into}: {len(cache)} judgment(s)")
    finally:
        cache.close()
    return 0


ARGUMENTS = {"merge": add_merge_arguments}
