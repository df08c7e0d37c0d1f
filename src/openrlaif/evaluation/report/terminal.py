"""The run's headline numbers as a table in the terminal, and the verdict of each comparison:
what `openrlaif run` and `openrlaif report` print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from openrlaif.evaluation.report.headline import headline_measures
from openrlaif.evaluation.report.load import RunData, load_run
from openrlaif.evaluation.report.reward_model import reward_model_checks
from openrlaif.evaluation.report.verdict import verdict


def print_summary(run_dir: str | Path | RunData, console: Any = None) -> None:
    """The headline numbers as a rich table, and the verdict in one sentence."""
    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    console = console or Console()
    table = Table(title=f"openrlaif run: {run.name}", header_style="bold", title_style="bold")
    wide = console.width >= 120  # the detail column only where it fits without wrapping everything
    for column, justify in (("measure", "left"), ("value", "right"), ("95% CI", "left"), ("detail", "left"))[
        : 4 if wide else 3
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    group = None
    for m in headline_measures(run):
        if m.group != group:
            table.add_row(Text(m.group, style="bold"))
            group = m.group
        cells = [
            Text("  " + m.name),
            Text(m.value, style="bold" if m.lead else ""),
            Text(m.ci),
            Text(m.detail),
        ]
        table.add_row(*cells[: 4 if wide else 3])
    for trainer in run.trainers:  # where RL ended (the curves are in the HTML report)
        for key, label in (("train/reward_mean", "final reward"), ("train/kl", "final KL")):
            if (value := trainer.last(key)) is not None:
                table.add_row(Text(f"{label} ({trainer.folder}/)"), Text(f"{value:.4g}"))
    console.print(table)
    for check in reward_model_checks(run):
        console.print(Text(check.sentence(), style="" if check.learned else "bold red"))
    if not run.comparisons:
        console.print(Text("No evaluation in this run yet (eval/eval.json is missing).", style="bold"))
    for comparison in run.comparisons:
        console.print(Text(str(verdict(comparison.summary)), style="bold"))
