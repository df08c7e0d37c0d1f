"""`openrlaif eval` (policy A against B), `openrlaif human export|import` (hybrid feedback) and
`openrlaif report` (a run's HTML report)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from openrlaif.cli.judge_args import add_judge_arguments, open_judge_from_args
from openrlaif.cli.output import pct, print_readings, print_server_stats
from openrlaif.data.lock import one_writer
from openrlaif.data.refs import prompt_records
from openrlaif.evaluation.evaluate import EvalSettings, evaluate, prompts_from_responses, resolve_side
from openrlaif.evaluation.human import INSTRUCTIONS, export_uncertain, import_labels
from openrlaif.evaluation.report import build_report, load_run, print_summary, verdict
from openrlaif.labeling import reading_stats, server_stats

# ---------------------------------------------------------------- eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, help="policy A: a model folder (sampled here) or a responses file")
    p.add_argument("--b", required=True, help="policy B: a model folder or a responses file")
    p.add_argument("--name-a", default=None, help="A's name in the outputs (default: from the path)")
    p.add_argument("--name-b", default=None, help="B's name in the outputs (default: from the path)")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompts file, or hh-harmless (its held-out part, never trained on); default: hh-harmless, "
        "or the prompts of a responses file when neither side is a model",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--out", required=True, help="output folder (eval.json, samples.jsonl); re-running resumes"
    )
    p.add_argument(
        "--harmless-judge", default=None, help="judge that scores each response alone (default: --judge)"
    )
    p.add_argument(
        "--harmless-threshold", type=float, default=0.0, help="harmless when score > this (default: 0)"
    )
    p.add_argument("--tie-margin", type=float, default=0.0, help="|p_a - 0.5| <= this is a tie (default: 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default: 16)")
    p.add_argument(
        "--device", default="auto", help="where models are sampled: auto, cpu, cuda (default: auto)"
    )
    p.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    add_judge_arguments(p)
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    sides = [resolve_side(args.a, args.name_a, "a"), resolve_side(args.b, args.name_b, "b")]
    source = args.prompts
    if source is None and any(s.kind == "model" for s in sides):
        source = "hh-harmless"
    if source == "hh-harmless":  # evaluation never uses prompts the pipeline trains on
        source = "hh-harmless:eval"
    prompts = prompt_records(source, args.limit) if source is not None else None
    if prompts is None and args.limit is not None:
        prompts = prompts_from_responses(next(s.spec for s in sides if s.kind == "responses"))[: args.limit]
    settings = EvalSettings(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        batch_size=args.batch_size, device=args.device, tie_margin=args.tie_margin,
        harmless_threshold=args.harmless_threshold, bootstrap_seed=args.seed, chunk_size=args.chunk_size,
    )  # fmt: skip
    with one_writer(args.out):  # a second evaluation into this folder is refused before loading judges
        judge = open_judge_from_args(args)
        harmless_judge = None
        try:
            if args.harmless_judge is not None:
                harmless_judge = open_judge_from_args(args, args.harmless_judge)
            summary = evaluate(
                args.a, args.b, prompts, judge, args.out, name_a=args.name_a, name_b=args.name_b,
                harmless_judge=harmless_judge, settings=settings, show_progress=not args.quiet,
            )  # fmt: skip
        finally:
            judge.close()
            if harmless_judge is not None:
                harmless_judge.close()
    if args.json:  # only the JSON, for pipes
        print(json.dumps(summary, indent=2))
        return 0
    print_eval_table(
        summary, f"A: {summary['a']['name']} vs B: {summary['b']['name']}, judged by {args.judge}"
    )
    print(verdict(summary))
    print_server_stats(server_stats(judge))
    print_readings(reading_stats(judge))
    print(f"summary -> {args.out}/eval.json; per prompt -> {args.out}/samples.jsonl")
    return 0


def _ci(d: dict[str, Any]) -> str:
    ci = d.get("ci95")
    return f"[{pct(ci[0])}, {pct(ci[1])}]" if ci else "n/a"


def print_eval_table(summary: dict[str, Any], title: str) -> None:
    wr, lc = summary["win_rate"], summary["length_controlled_win_rate"]
    harmless, length = summary["harmless_rate"], summary["length"]
    table = Table(title=title, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("note")
    table.add_row(
        "win rate of A",
        pct(wr["value"]),
        _ci(wr),
        f"{wr['wins']}W {wr['ties']}T {wr['losses']}L of {wr['n']}",
    )
    table.add_row(
        "length-controlled", pct(lc["value"]), _ci(lc), f"length coef {lc['coef_log_length_ratio']:+.2f}"
    )
    for side in ("a", "b"):
        table.add_row(
            f"harmless rate {side.upper()}",
            pct(harmless[side]["value"]),
            _ci(harmless[side]),
            f"score > {harmless['threshold']:g}",
        )
    for stat in ("mean", "median"):
        values = f"{length['a'][f'{stat}_chars']:.0f} / {length['b'][f'{stat}_chars']:.0f}"
        table.add_row(f"{stat} length", values, "", "characters, A / B")
    table.add_row("order agreement", pct(summary["order_agreement"]), "", "same pick, both orders")
    Console().print(table)
    print(
        "Win rate: each pair judged in both orders, ties count half. Length-controlled: the win rate at\n"
        "equal length (logistic fit on log(len A / len B); coef > 0: the judge favours the longer)."
    )


# ---------------------------------------------------------------- human export|import


def add_human_arguments(p: argparse.ArgumentParser) -> None:
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")
    q = steps.add_parser("export", help="the pairs the AI labeler is least sure of, to label by hand")
    q.add_argument("--labeled", required=True, help="AI-labeled pairs (`openrlaif label` output)")
    q.add_argument("--out", required=True, help="file to label: .csv (spreadsheets) or .jsonl")
    q.add_argument("--n", type=int, default=50, help="how many pairs (default: 50)")
    q.set_defaults(handler=cmd_human_export)
    q = steps.add_parser("import", help="people's labels override the AI's in a new labeled file")
    q.add_argument("--labeled", required=True, help="the AI-labeled pairs the export came from")
    q.add_argument("--filled", required=True, help="the exported file with human_label filled in")
    q.add_argument(
        "--out", required=True, help="new labeled file (.jsonl/.parquet) for `openrlaif train rm|dpo`"
    )
    q.set_defaults(handler=cmd_human_import)


def cmd_human_export(args: argparse.Namespace) -> int:
    result = export_uncertain(args.labeled, args.out, args.n)
    print(
        f"exported the {result.exported} least confident of {result.candidates} AI-labeled pairs -> {result.out} "
        f"({result.orders_disagree} where the two orders disagree)"
    )
    print(INSTRUCTIONS)
    print(
        f"then: openrlaif human import --labeled {args.labeled} --filled {args.out} --out <new labeled file>"
    )
    return 0


def cmd_human_import(args: argparse.Namespace) -> int:
    result = import_labels(args.labeled, args.filled, args.out)
    print(
        f"imported {result.human} human label(s) ({result.ties} ties; {result.blank} rows left blank) -> {result.out} "
        f"({result.rows} pairs; the human label overrides the AI's in {len(result.changed)} where they disagree)"
    )
    if result.already_human:
        print(f"{result.already_human} pair(s) labeled by people in an earlier import are kept")
    print(f"train on it as usual, e.g. openrlaif train rm --config ... --set data={result.out}")
    return 0


# ---------------------------------------------------------------- report


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--out", default=None, help="HTML file to write (default: <run_dir>/report.html)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    path = build_report(run, args.out)
    if not args.quiet:
        print_summary(run)
    print(f"report -> {path}")
    return 0


ARGUMENTS = {"eval": add_eval_arguments, "human": add_human_arguments, "report": add_report_arguments}
