"""`openrlaif train sft|rm|dpo|rl`: one trainer from a YAML config, with `--set` overrides."""

from __future__ import annotations

import argparse
import os

TRAINERS_HELP = {
    "sft": "supervised fine-tuning on prompt/completion data (loss on the completion tokens)",
    "rm": "reward model on AI-labeled pairs (soft labels p_chosen) or prompt/chosen/rejected pairs",
    "dpo": "DPO on AI-labeled pairs (soft labels p_chosen) or prompt/chosen/rejected pairs; reference log-probs computed once",
    "rl": "RL from AI feedback: REINFORCE with a learned value baseline (the paper), RLOO, PPO or online DPO; "
    "reward from a reward model or a judge (d-RLAIF score or pairwise)",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    algorithms = p.add_subparsers(dest="algorithm", required=True, metavar="ALGORITHM")
    for name, what in TRAINERS_HELP.items():
        q = algorithms.add_parser(name, help=what)
        q.add_argument(
            "--config",
            required=True,
            help="YAML config file, or a shipped one by name (configs/train/: sft-tiny, rm-tiny, dpo-tiny, rl-tiny)",
        )
        q.add_argument(
            "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
        )
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config setting (VALUE is read as YAML), e.g. --set max_steps=100; repeatable",
        )
        q.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    # why: start-up — the trainers load torch, which `openrlaif train --help` does not need
    from openrlaif.training import TRAINERS
    from openrlaif.training.config import load_train_config, resolve_train_config_path
    from openrlaif.training.metrics import format_metrics

    config_class, train = TRAINERS[args.algorithm]
    config = load_train_config(resolve_train_config_path(args.config), config_class, args.set)
    result = train(config, resume=args.resume, show_progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one summary
        if result.first_metrics:
            print(f"held-out before training: {format_metrics(result.first_metrics)}")
        if result.metrics:
            print(f"held-out after {result.steps} steps: {format_metrics(result.metrics)}")
        else:
            print(f"trained {result.steps} steps; no held-out data (eval_fraction: 0 and no eval_data)")
        print(f"model -> {result.model_dir}; metrics -> {result.output_dir / 'metrics.jsonl'}")
    return 0


ARGUMENTS = {"train": add_train_arguments}
