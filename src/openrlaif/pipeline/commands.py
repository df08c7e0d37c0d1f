"""`openrlaif run` and `openrlaif quickstart`: the command-line side of the pipeline."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from openrlaif.errors import ConfigError

QUICKSTART = "quickstart"  # the shipped experiment configs/experiments/quickstart.yaml
QUICKSTART_TINY = "quickstart-tiny"


def _parse_sets(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. policies.rlaif.settings.beta=0.1")
        overrides[key] = yaml.safe_load(value)
    return overrides


def add_pipeline_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="the whole pipeline from one YAML file; re-running skips what is done")
    p.add_argument(
        "experiment", help="experiment YAML (see experiments/), or a shipped one's name (quickstart)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting by its dotted path, VALUE read as YAML (e.g. eval.limit=50); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--run-dir", default=None, help="where the run's files go (default: run_dir or runs/<name>)"
    )
    p.add_argument("--dry-run", action="store_true", help="list the stages and what would run, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")

    p = sub.add_parser(
        "quickstart",
        help="the embedded default end to end, offline on CPU: SFT, AI labels, reward model, RL, evaluation, report",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a minimal run (under 90 s): checks the machinery, nothing more"
    )
    p.add_argument(
        "--run-dir", default=None, help="default: runs/quickstart (runs/quickstart-tiny with --tiny)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def _load(experiment: str, sets: list[str], run_dir: str | None) -> Any:
    from openrlaif.pipeline.config import load_pipeline_config

    overrides = _parse_sets(sets)
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    return load_pipeline_config(experiment, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from openrlaif.pipeline.run import describe_plan, run_pipeline

    config = _load(args.experiment, args.set, args.run_dir)
    if args.dry_run:
        for row in describe_plan(config):
            reads = f"  (reads {', '.join(row['reads'])})" if row["reads"] else ""
            print(f"  {row['stage']:28s} {row['status']}{reads}")
        return 0
    result = run_pipeline(config, show_progress=not args.quiet, quiet=args.quiet)
    _finish(result, config)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from openrlaif.pipeline.run import run_pipeline

    name = QUICKSTART_TINY if args.tiny else QUICKSTART
    config = _load(name, [], args.run_dir)
    print(
        "openrlaif quickstart: a small GPT trained by this project on HH-RLHF dialogues is fine-tuned (SFT),\n"
        "samples answers to harmless-split prompts, the offline default judge labels pairs of them in both\n"
        "orders, a reward model learns the soft labels and RL improves the policy against it (canonical\n"
        "RLAIF); a second RL policy takes the judge's own score as its reward (d-RLAIF). The same judge then\n"
        "compares each with the SFT policy, and the two with each other, on held-out prompts.\n"
        "Re-running skips what is done."
    )
    result = run_pipeline(config, show_progress=not args.quiet, quiet=args.quiet)
    _finish(result, config)
    return 0


def _finish(result: Any, config: Any) -> None:
    from openrlaif.evaluation.report import print_summary

    print_summary(result.run_dir)
    done = f"{len(result.ran)} stage(s) run, {len(result.resumed)} resumed, {len(result.skipped)} up to date"
    print(f"{done}; {result.seconds:.0f}s. Run directory: {result.run_dir}")
    report = result.run_dir / "report.html"
    if report.exists():
        print(f"report: {report}")
