"""The `openrlaif` command line: one entry point, one sub-command per stage.

Errors a user can cause end as one line on stderr (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from openrlaif.errors import OpenRLAIFError
from openrlaif.evaluation.commands import cmd_eval, cmd_human
from openrlaif.evaluation.report import add_report_command, cmd_report

DEFAULT_JUDGE = "embedding-harmless"
PAPER_NOTE = "RLAIF paper's best labeler on harmless: 72.1%; human inter-annotator agreement: 73-77%"


def _add_judge_args(p: argparse.ArgumentParser) -> None:
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


TRAINERS_HELP = {
    "sft": "supervised fine-tuning on prompt/completion data (loss on the completion tokens)",
    "rm": "reward model on AI-labeled pairs (soft labels p_chosen) or prompt/chosen/rejected pairs",
    "dpo": "DPO on AI-labeled pairs (soft labels p_chosen) or prompt/chosen/rejected pairs; reference log-probs computed once",
    "rl": "RL from AI feedback: REINFORCE with a learned value baseline (the paper), RLOO, PPO or online DPO; "
    "reward from a reward model or a judge (d-RLAIF score or pairwise)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openrlaif",
        description="Align language models with AI feedback (RLAIF), and measure what happened.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("label", help="AI-label pairs: P(A preferred), both orders averaged")
    p.add_argument(
        "--pairs",
        required=True,
        help="pairs file (.jsonl/.jsonl.gz/.parquet): prompt + response_a/response_b, or prompt/chosen/rejected",
    )
    p.add_argument("--out", required=True, help="labeled output (.jsonl or .parquet); re-running resumes")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip bad input rows (and report how many) instead of stopping",
    )
    _add_judge_args(p)

    p = sub.add_parser("align", help="measure an AI labeler against human labels")
    p.add_argument(
        "--dataset",
        default="hh-harmless",
        help="built-in dataset name or a pairs file with human labels (default: hh-harmless)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument(
        "--labels-out", default=None, help="labeled pairs file (default: beside --out, <name>.labels.jsonl)"
    )
    p.add_argument("--skip-invalid", action="store_true", help="skip bad input rows instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_judge_args(p)

    p = sub.add_parser("score", help="d-RLAIF: score each response directly, in [-1, 1]")
    p.add_argument("--responses", required=True, help="responses file: prompt, response (+ optional id)")
    p.add_argument("--out", required=True, help="scored output (.jsonl or .parquet); re-running resumes")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad input rows instead of stopping")
    _add_judge_args(p)

    sub.add_parser("judges", help="list the shipped judge configs and prompt templates")
    sub.add_parser("datasets", help="list the built-in datasets")

    p = sub.add_parser("train", help="train: SFT, reward model, DPO or RL on AI feedback")
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

    from openrlaif.generation import add_generate_command

    add_generate_command(sub)

    from openrlaif.distill import add_distill_command
    from openrlaif.pipeline.commands import add_pipeline_commands

    add_distill_command(sub)
    add_pipeline_commands(sub)

    from openrlaif.evaluation.commands import add_eval_commands

    add_eval_commands(sub)
    add_report_command(sub)
    return parser


# ---------------------------------------------------------------- helpers


def _open_judge(args: argparse.Namespace):  # -> Judge
    from openrlaif.judges import JudgmentCache, build_judge, load_judge_config
    from openrlaif.judges.cache import default_cache_path

    config = load_judge_config(args.judge)
    cache = None if args.no_cache else JudgmentCache(args.cache or default_cache_path())
    return build_judge(config, cache)


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} invalid row(s); first: {skipped[0]}", file=sys.stderr)


def _print_job(result: Any, what: str) -> None:
    print(
        f"{what}: {result.total} rows -> {result.out} ({result.written} new, {result.resumed} already done); "
        f"judgments: {result.cache_hits} from cache, {result.cache_misses} computed; {result.seconds:.1f}s"
    )


def _print_server_stats(judge: Any) -> None:
    """Request counters of HTTP judges (an ensemble's members included)."""
    for member in [judge, *getattr(judge, "members", [])]:
        if hasattr(member, "stats"):
            for url, st in member.stats()["servers"].items():
                print(
                    f"  {url}: {st['requests']} requests, {st['retries']} retries, {st['failures']} failures"
                )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_alignment_table(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("what it means")
    ci = metrics.get("alignment_ci95")
    ci_text = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
    table.add_row(
        "pairs", str(metrics["pairs"]), f"{metrics['pairs_with_human_label']} with a human preference"
    )
    table.add_row(
        "AI labeler alignment",
        _pct(metrics["alignment"]) + ci_text,
        "argmax soft label = human label (95% bootstrap CI)",
    )
    table.add_row(
        "same position preferred",
        _pct(metrics["same_position_preferred"]),
        "picks the same slot in both orders (position bias)",
    )
    table.add_row(
        "mean P(slot 1)", _pct(metrics["mean_p_first_slot"]), "50% = no preference for the first slot"
    )
    table.add_row(
        "P(prefers longer)",
        _pct(metrics["p_prefers_longer"]),
        f"humans: {_pct(metrics['human_p_prefers_longer'])} (length bias)",
    )
    ece = metrics["ece"]
    table.add_row(
        "calibration error (ECE)", "n/a" if ece is None else f"{ece:.3f}", "0 = confidence matches accuracy"
    )
    table.add_row("mean confidence", _pct(metrics["mean_confidence"]), "mean max(p, 1-p)")
    job = metrics.get("job", {})
    if job:
        table.add_row(
            "judgments from cache",
            f"{job['cache_hits']} / {job['cache_hits'] + job['cache_misses']}",
            "single-order judgments re-used this run",
        )
        table.add_row(
            "time", f"{job['seconds']:.1f}s", f"{job['total'] / max(job['seconds'], 1e-9):.1f} pairs/s"
        )
    Console().print(table)
    print(PAPER_NOTE)


# ---------------------------------------------------------------- commands


def _judge_file(args: argparse.Namespace, records_path: str, read: Any, job: Any, what: str) -> int:
    """label/score: read the input, run the resumable job with the judge, report."""
    from openrlaif.data.lock import one_writer

    result_read = read(records_path, skip_invalid=args.skip_invalid)
    _report_skipped(result_read.skipped)
    with one_writer(args.out):  # a second writer is refused before the judge is even loaded
        judge = _open_judge(args)
        try:
            result = job(
                result_read.records, judge, args.out, chunk_size=args.chunk_size, show_progress=not args.quiet
            )
        finally:
            judge.close()
    _print_job(result, what)
    _print_server_stats(judge)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from openrlaif.data.io import read_pairs
    from openrlaif.labeling import label_pairs

    return _judge_file(args, args.pairs, read_pairs, label_pairs, "labeled")


def run_align(
    dataset: str, judge_name: str, out: str | Path, labels_out: str | Path | None = None, limit: int | None = None,
    skip_invalid: bool = False, seed: int = 0, cache: str | None = None, no_cache: bool = False,
    chunk_size: int = 64, quiet: bool = False,
) -> dict[str, Any]:  # fmt: skip
    from openrlaif.data.datasets import load_pairs
    from openrlaif.data.io import write_text_atomic
    from openrlaif.data.lock import one_writer
    from openrlaif.labeling import alignment_metrics, label_pairs, load_labeled

    read = load_pairs(dataset, skip_invalid=skip_invalid, limit=limit)
    out = Path(out)
    labels_path = Path(labels_out) if labels_out else out.with_name(out.stem + ".labels.jsonl")
    args = argparse.Namespace(judge=judge_name, cache=cache, no_cache=no_cache)
    with one_writer(labels_path):  # refused before the judge is loaded when another job writes it
        judge = _open_judge(args)
        try:
            job = label_pairs(
                read.records, judge, labels_path, chunk_size=chunk_size, show_progress=not quiet
            )
        finally:
            judge.close()
    wanted = {p.id for p in read.records}
    labeled = [x for x in load_labeled(labels_path) if x.id in wanted]
    metrics = alignment_metrics(labeled, seed=seed)
    metrics.update(
        dataset=dataset, judge=judge_name, judge_identity=judge.identity("pair").to_dict(), labels=str(labels_path),
        source_rows_skipped=len(read.skipped), job=job.to_dict(),
    )  # fmt: skip
    write_text_atomic(out, json.dumps(metrics, indent=2) + "\n")
    return metrics


def cmd_align(args: argparse.Namespace) -> int:
    metrics = run_align(
        args.dataset, args.judge, args.out, args.labels_out, args.limit, args.skip_invalid, args.seed,
        args.cache, args.no_cache, args.chunk_size, args.quiet,
    )  # fmt: skip
    title = f"AI labeler alignment: {args.judge} on {args.dataset}"
    print_alignment_table(metrics, title)
    if metrics["source_rows_skipped"]:
        print(f"{metrics['source_rows_skipped']} source row(s) were not usable pairs and were skipped")
    print(f"metrics -> {args.out}; labels -> {metrics['labels']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from openrlaif.data.io import read_responses
    from openrlaif.labeling import score_responses

    return _judge_file(args, args.responses, read_responses, score_responses, "scored")


def cmd_judges(args: argparse.Namespace) -> int:
    from openrlaif.config import PACKAGED_JUDGE_DIR, builtin_judge_names, read_yaml
    from openrlaif.judges.prompts import builtin_template_names

    print("shipped judges (use the name, or a path to your own YAML file):")
    for name in builtin_judge_names():
        data = read_yaml(PACKAGED_JUDGE_DIR / f"{name}.yaml")
        print(f"  {name:24s} backend={data.get('backend')} model={data.get('model', '-')}")
    print("prompt templates (judge setting `template:`): " + ", ".join(builtin_template_names()))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from openrlaif.data.datasets import BUILTIN_DATASETS

    for ds in BUILTIN_DATASETS.values():
        print(f"  {ds.name:16s} {ds.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
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


def cmd_generate(args: argparse.Namespace) -> int:
    from openrlaif.generation import cmd_generate as run

    return run(args)


def cmd_distill(args: argparse.Namespace) -> int:
    from openrlaif.distill import cmd_distill as run

    return run(args)


def cmd_run(args: argparse.Namespace) -> int:
    from openrlaif.pipeline.commands import cmd_run as run

    return run(args)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from openrlaif.pipeline.commands import cmd_quickstart as run

    return run(args)


COMMANDS = {
    "label": cmd_label, "align": cmd_align, "score": cmd_score, "judges": cmd_judges,
    "datasets": cmd_datasets, "quickstart": cmd_quickstart, "train": cmd_train, "generate": cmd_generate,
    "distill": cmd_distill, "run": cmd_run, "eval": cmd_eval, "human": cmd_human,
    "report": cmd_report,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OpenRLAIFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk where no writer named its file is one line too
        from openrlaif.data.io import is_disk_full
        from openrlaif.errors import DiskFullError

        if not is_disk_full(e):
            raise
        print(
            f"error: {DiskFullError(getattr(e, 'filename', None) or 'a file being written')}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
