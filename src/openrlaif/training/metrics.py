"""What a run reports: the rich progress bar, `metrics.jsonl` and the trackers of `report_to`
(TensorBoard, W&B, trackio; trackers.py) through `MetricsLogger`, samples and tokens per second
(`Throughput`), the example ids each process trained on (`ExampleIdLog`), and the one-line
summary of a metrics dict (`format_metrics`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from openrlaif.data.io import disk_full_error, write_text_atomic
from openrlaif.training.config import TrainConfig
from openrlaif.training.trackers import open_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator


def truncate_jsonl(path: Path, keep_up_to_step: int) -> None:
    """Drop rows logged after `keep_up_to_step` (steps redone after a resume would repeat them)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed run
            continue
        if row.get("step", 0) <= keep_up_to_step:
            rows.append(line)
    write_text_atomic(path, "".join(r + "\n" for r in rows))


def append_line(path: Path, row: dict[str, Any]) -> None:
    """One JSON line appended to a log (metrics, example ids); a full disk is one line naming it.
    A torn last line from a killed run is skipped by readers and cut by `truncate_jsonl`."""
    with disk_full_error(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


class ExampleIdLog:
    """`example_ids.rank{r}.jsonl`: which examples this process trained on at each step."""

    def __init__(self, output_dir: Path, rank: int, enabled: bool) -> None:
        self.path = output_dir / f"example_ids.rank{rank}.jsonl"
        self.enabled = enabled

    def write(self, step: int, ids: list[str]) -> None:
        if self.enabled:
            append_line(self.path, {"step": step, "ids": ids})


@dataclass
class Throughput:
    """Samples and tokens per second of one optimizer step, over all processes."""

    started: float = field(default_factory=time.perf_counter)

    def rates(self, samples: float, tokens: float) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.started = time.perf_counter()
        return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


class MetricsLogger:
    """Metrics to the console (rich progress bar), `metrics.jsonl` and the trackers of `report_to`;
    main process only."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        config: TrainConfig,
        total_steps: int,
        start_step: int,
        title: str,
        show_progress: bool,
    ) -> None:
        self.active = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        # TensorBoard, W&B, trackio (`report_to`), continuing their runs when resuming
        self.trackers = open_trackers(output_dir, config, start_step, show_progress) if self.active else []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))  # fmt: skip
        self.progress = Progress(*columns, disable=not (self.active and show_progress))
        self.task = self.progress.add_task(title, total=total_steps, completed=start_step, info="")
        self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        append_line(self.path, {"step": step, **metrics})
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def advance(self, step: int, info: str) -> None:
        if self.active:
            self.progress.update(self.task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self.active:
            self.progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()
        trackers, self.trackers = self.trackers, []  # closed once, even if called again
        for tracker in trackers:
            tracker.close()


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
