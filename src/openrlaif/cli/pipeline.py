"""`openrlaif run experiment.yaml` and `openrlaif quickstart`: the whole pipeline, resumably."""

from __future__ import annotations

import argparse

from openrlaif.config import parse_set_overrides
from openrlaif.evaluation.report import REPORT_FILE, print_summary
from openrlaif.pipeline import PipelineConfig, RunResult, load_pipeline_config, run_pipeline
from openrlaif.pipeline.run import describe_plan

QUICKSTART = "quickstart"  # the shipped experiment configs/experiments/quickstart.yaml
QUICKSTART_TINY = "quickstart-tiny"
QUICKSTART_INTRO = (
    "openrlaif quickstart: a small GPT trained by this project on HH-RLHF dialogues is fine-tuned (SFT),\n"
    "samples answers to harmless-split prompts, the offline default judge labels pairs of them in both\n"
    "orders, a reward model learns the soft labels and RL improves the policy against it (canonical\n"
    "RLAIF); a second RL policy takes the judge's own score as its reward (d-RLAIF). The same judge then\n"
    "compares each with the SFT policy, and the two with each other, on held-out prompts.\n"
    "Re-running skips what is done."
)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
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
    p.set_defaults(handler=cmd_run)


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tiny", action="store_true", help="a minimal run (under 90 s): checks the machinery, nothing more"
    )
    p.add_argument(
        "--run-dir", default=None, help="default: runs/quickstart (runs/quickstart-tiny with --tiny)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    p.set_defaults(handler=cmd_quickstart)


def _load(experiment: str, sets: list[str], run_dir: str | None) -> PipelineConfig:
    overrides = parse_set_overrides(sets, example="policies.rlaif.settings.beta=0.1")
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    return load_pipeline_config(experiment, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.experiment, args.set, args.run_dir)
    if args.dry_run:
        for row in describe_plan(config):
            reads = f"  (reads {', '.join(row['reads'])})" if row["reads"] else ""
            print(f"  {row['stage']:28s} {row['status']}{reads}")
        return 0
    _finish(run_pipeline(config, show_progress=not args.quiet, quiet=args.quiet))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    config = _load(QUICKSTART_TINY if args.tiny else QUICKSTART, [], args.run_dir)
    print(QUICKSTART_INTRO)
    _finish(run_pipeline(config, show_progress=not args.quiet, quiet=args.quiet))
    return 0


def _finish(result: RunResult) -> None:
    print_summary(result.run_dir)
    done = f"{len(result.ran)} stage(s) run, {len(result.resumed)} resumed, {len(result.skipped)} up to date"
    print(f"{done}; {result.seconds:.0f}s. Run directory: {result.run_dir}")
    report = result.run_dir / REPORT_FILE
    if report.exists():
        print(f"report: {report}")


ARGUMENTS = {"run": add_run_arguments, "quickstart": add_quickstart_arguments}
