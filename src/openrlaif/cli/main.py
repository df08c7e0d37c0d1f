"""The `openrlaif` entry point: the parser, and the dispatch of each command to its group module.

Start-up stays fast: `openrlaif --help` lists the commands from the table below without loading
any group module, and a command loads only its own group (torch only where a command needs it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Collection, Sequence

from openrlaif.data.io import is_disk_full
from openrlaif.errors import DiskFullError, OpenRLAIFError

# command -> (its module in openrlaif.cli, the one line `openrlaif --help` shows), in help order.
# Each module has ARGUMENTS: {command: function adding the command's arguments and its handler}.
COMMANDS: dict[str, tuple[str, str]] = {
    "label": ("label", "AI-label pairs: P(A preferred), both orders averaged"),
    "align": ("label", "measure an AI labeler against human labels"),
    "score": ("label", "d-RLAIF: score each response directly, in [-1, 1]"),
    "merge": ("merge", "join the parts of a sharded `label` (checked), or judgment caches"),
    "judges": ("listing", "list the shipped judge configs and prompt templates"),
    "datasets": ("listing", "list the built-in datasets"),
    "train": ("train", "train: SFT, reward model, DPO or RL on AI feedback"),
    "generate": ("generate", "sample N responses per prompt from a policy (candidates to label)"),
    "distill": ("distill", "a teacher model writes SFT demonstrations (prompt + completion)"),
    "run": ("pipeline", "the whole pipeline from one YAML file; re-running skips what is done"),
    "quickstart": (
        "pipeline",
        "the embedded default end to end, offline on CPU: SFT, AI labels, reward model, RL, evaluation, report",
    ),
    "eval": ("evaluate", "judge policy A against B: win rate, length-controlled, harmless rate"),
    "human": ("evaluate", "hybrid feedback: export uncertain AI labels, import people's labels"),
    "report": ("evaluate", "write a run's self-contained HTML report (plots, tables, samples)"),
}


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `openrlaif` parser. Every command is listed; the arguments of those in `commands` (all
    by default) are added, which loads their group modules."""
    parser = argparse.ArgumentParser(
        prog="openrlaif",
        description="Align language models with AI feedback (RLAIF), and measure what happened.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if commands is None or name in commands:
            group = importlib.import_module(f"openrlaif.cli.{module}")
            group.ARGUMENTS[name](command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = argv[:1] if argv[:1] and argv[0] in COMMANDS else []  # only the command given is loaded
    args = build_parser(wanted).parse_args(argv)
    try:
        return args.handler(args)
    except OpenRLAIFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk where no writer named its file is one line too
        if not is_disk_full(e):
            raise
        print(
            f"error: {DiskFullError(getattr(e, 'filename', None) or 'a file being written')}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130
