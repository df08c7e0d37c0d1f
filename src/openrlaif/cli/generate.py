"""`openrlaif generate`: sample N responses per prompt; a config file's settings, flags on top."""

from __future__ import annotations

import argparse

from openrlaif.cli.output import print_server_stats
from openrlaif.config import parse_set_overrides
from openrlaif.generation import generate, load_generate_config

# flags that override the config file's setting of the same name (None: not given)
SETTING_FLAGS = ("policy", "prompts", "out", "pairs_out", "num_responses", "temperature", "max_new_tokens",
                 "seed", "batch_size", "limit", "skip_invalid")  # fmt: skip


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="generate config YAML, or a shipped one's name (generate-tiny)"
    )
    p.add_argument("--policy", default=None, help="model folder or Hugging Face id, sampled in process")
    p.add_argument("--prompts", default=None, help="prompts file (prompt + optional id) or hh-harmless")
    p.add_argument("--out", default=None, help="responses output (.jsonl); re-running resumes")
    p.add_argument(
        "--pairs-out", default=None, help="also write pairs of distinct responses (.jsonl/.parquet)"
    )
    p.add_argument("-n", "--num-responses", type=int, default=None, help="samples per prompt (default: 4)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest response (default: 128)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per generate call (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--skip-invalid", action="store_true", default=None, help="skip bad prompt rows")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config setting (VALUE is read as YAML), e.g. --set server.concurrency=4; repeatable",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    config = load_generate_config(
        args.config,
        {name: getattr(args, name) for name in SETTING_FLAGS},
        parse_set_overrides(args.set, example="temperature=0.7"),
    )
    result = generate(config, show_progress=not args.quiet)
    if result.skipped_invalid:
        print(f"skipped {len(result.skipped_invalid)} invalid row(s); first: {result.skipped_invalid[0]}")
    print(
        f"generated: {result.prompts} prompts x {config.num_responses} -> {result.out} ({result.written} new, "
        f"{result.resumed} already done); {result.seconds:.1f}s"
    )
    if result.pairs_out is not None:
        print(f"pairs: {result.pairs} -> {result.pairs_out} (label them with `openrlaif label --pairs ...`)")
    print_server_stats(list((result.server_stats or {}).get("servers", {}).items()))
    return 0


ARGUMENTS = {"generate": add_generate_arguments}
