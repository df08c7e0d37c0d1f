"""`openrlaif label`, `align` and `score`: a judge over a file of pairs or responses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from openrlaif.cards import describe_data, write_dataset_card
from openrlaif.cli.judge_args import add_judge_arguments, open_judge_from_args
from openrlaif.cli.output import pct, print_readings, print_server_stats
from openrlaif.data.io import ReadResult, read_pairs, read_responses
from openrlaif.data.lock import one_writer
from openrlaif.labeling import (
    JobResult,
    label_pairs,
    measure_alignment,
    parse_shard,
    print_undecided,
    reading_stats,
    score_responses,
    server_stats,
)

PAPER_NOTE = "RLAIF paper's best labeler on harmless: 72.1%; human inter-annotator agreement: 73-77%"


def add_label_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="label only shard I of N (0 <= I < N): the pairs whose sha256(id) mod N is I, the same on "
        "every machine; join the N outputs with `openrlaif merge labels`",
    )
    add_judge_arguments(p)
    p.set_defaults(handler=cmd_label)


def add_align_arguments(p: argparse.ArgumentParser) -> None:
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
    add_judge_arguments(p)
    p.set_defaults(handler=cmd_align)


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--responses", required=True, help="responses file: prompt, response (+ optional id)")
    p.add_argument("--out", required=True, help="scored output (.jsonl or .parquet); re-running resumes")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad input rows instead of stopping")
    add_judge_arguments(p)
    p.set_defaults(handler=cmd_score)


def _judge_file(
    args: argparse.Namespace, records_path: str, read: Callable[..., ReadResult], job: Callable[..., JobResult],
    what: str, **job_options: Any,
) -> int:  # fmt: skip
    """label/score: read the input, run the resumable job with the judge, report."""
    result_read = read(records_path, skip_invalid=args.skip_invalid)
    if result_read.skipped:
        skipped = result_read.skipped
        print(f"skipped {len(skipped)} invalid row(s); first: {skipped[0]}", file=sys.stderr)
    with one_writer(args.out):  # a second writer is refused before the judge is even loaded
        judge = open_judge_from_args(args)
        try:
            result = job(
                result_read.records, judge, args.out, chunk_size=args.chunk_size, show_progress=not args.quiet,
                **job_options,
            )  # fmt: skip
        finally:
            judge.close()
    print(
        f"{what}: {result.total} rows -> {result.out} ({result.written} new, {result.resumed} already done); "
        f"judgments: {result.cache_hits} from cache, {result.cache_misses} computed; {result.seconds:.1f}s"
    )
    print_server_stats(server_stats(judge))
    print_readings(reading_stats(judge))
    print_undecided(result.undecided, result.out)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    shard = None if args.shard is None else parse_shard(args.shard)  # refused before anything is read
    what = "labeled" if shard is None else f"labeled shard {shard}"
    code = _judge_file(args, args.pairs, read_pairs, label_pairs, what, shard=shard)
    card = write_dataset_card(args.out, describe_data(args.pairs), args.judge)  # the Hub's dataset card
    print(f"dataset card -> {card}")
    return code


def cmd_score(args: argparse.Namespace) -> int:
    return _judge_file(args, args.responses, read_responses, score_responses, "scored")


def cmd_align(args: argparse.Namespace) -> int:
    result = measure_alignment(
        args.dataset, args.judge, args.out, labels_out=args.labels_out, limit=args.limit,
        skip_invalid=args.skip_invalid, seed=args.seed, cache=args.cache, no_cache=args.no_cache,
        chunk_size=args.chunk_size, show_progress=not args.quiet,
    )  # fmt: skip
    print_alignment_table(result.metrics, f"AI labeler alignment: {args.judge} on {args.dataset}")
    print_readings(result.metrics["job"].get("readings"))
    print_undecided(result.metrics["job"]["undecided"], str(result.labels))
    if result.source_rows_skipped:
        print(f"{result.source_rows_skipped} source row(s) were not usable pairs and were skipped")
    print(f"metrics -> {args.out}; labels -> {result.labels}")
    return 0


def print_alignment_table(metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("what it means")

    def with_ci(name: str) -> str:  # the value and its 95% bootstrap CI where there is one
        ci = metrics.get(f"{name}_ci95")
        return pct(metrics[name]) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")

    table.add_row(
        "pairs", str(metrics["pairs"]), f"{metrics['pairs_with_human_label']} with a human preference"
    )
    table.add_row(
        "AI labeler alignment",
        with_ci("alignment"),
        "argmax soft label = human label (95% bootstrap CI)",
    )
    table.add_row(
        "same position preferred",
        with_ci("same_position_preferred"),
        "picks the same slot in both orders (position bias)",
    )
    table.add_row("mean P(slot 1)", with_ci("mean_p_first_slot"), "50% = no preference for the first slot")
    table.add_row(
        "P(prefers longer)",
        with_ci("p_prefers_longer"),
        f"humans: {pct(metrics['human_p_prefers_longer'])} (length bias)",
    )
    ece = metrics["ece"]
    table.add_row(
        "calibration error (ECE)", "n/a" if ece is None else f"{ece:.3f}", "0 = confidence matches accuracy"
    )
    table.add_row("mean confidence", pct(metrics["mean_confidence"]), "mean max(p, 1-p)")
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


ARGUMENTS = {"label": add_label_arguments, "align": add_align_arguments, "score": add_score_arguments}
