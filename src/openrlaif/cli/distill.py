"""`openrlaif distill`: a teacher model writes SFT demonstrations (prompt + completion)."""

from __future__ import annotations

import argparse

from openrlaif.data.io import read_jsonl_dicts
from openrlaif.distill import distill, teacher_source
from openrlaif.errors import ConfigError


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher", default=None, help="teacher model: folder or Hugging Face id (sampled in process)"
    )
    p.add_argument(
        "--teacher-judge", default=None, help="... or a judge config (hf or openai) whose model writes"
    )
    p.add_argument(
        "--prompts", required=True, help="prompts file (prompt + optional id) or a built-in dataset"
    )
    p.add_argument(
        "--out", required=True, help="demonstrations (.jsonl: id, prompt, completion); re-running resumes"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    if not args.out.endswith(".jsonl"):
        raise ConfigError(f"--out: must be a .jsonl file, got {args.out!r}")
    source = teacher_source(args.teacher, args.teacher_judge)
    out = distill(
        source, args.prompts, args.out, args.temperature, args.max_new_tokens, args.limit, args.seed,
        show_progress=not args.quiet,
    )  # fmt: skip
    n = len(read_jsonl_dicts(out))
    print(f"distilled: {n} demonstrations -> {out} (train on them: openrlaif train sft --set data={out})")
    return 0


ARGUMENTS = {"distill": add_distill_arguments}
