"""Experiment trackers (`report_to:`): TensorBoard, Weights & Biases and trackio get the rows of
`metrics.jsonl`, from the main process (`MetricsLogger` holds them).

- `tensorboard`: events under `output_dir/tensorboard/`; a resumed run purges the events of the
  steps it redoes (`purge_step`).
- `wandb`: one W&B run per training run, its files under `output_dir/wandb/` (or `$WANDB_DIR`).
  `WANDB_MODE=offline` writes the run locally for `wandb sync` later. Login is wandb's own
  (`wandb login` or `WANDB_API_KEY`): openrlaif never reads, writes or logs the key.
- `trackio`: a local SQLite project under `$TRACKIO_DIR` (default `$HF_HOME/trackio`), or a Space
  with `TRACKIO_SPACE_ID`; `trackio show` opens its dashboard.

Resuming: `output_dir/trackers.json` holds each tracker's run (the W&B run id, the trackio run
name) and how far the run had logged. A resumed run (one that loaded a checkpoint) continues the
same W&B run (`id`, `resume="allow"`) and trackio run (`resume="allow"`, by name), and leaves out
the steps the interrupted run had already logged up to (`logged_up_to`, taken from
`metrics.jsonl` before it is cut back to the checkpoint: `note_logged_steps`). Resumes are exact,
so those steps' numbers are the same ones again (but the throughput's, a timing). A run that starts from step 0 starts new tracker
runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Protocol

from openrlaif.config import check_trackers
from openrlaif.data.io import iter_rows, write_text_atomic
from openrlaif.errors import ConfigError
from openrlaif.training.config import TrainConfig

STATE_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def read_state(output_dir: Path) -> dict[str, Any]:
    path = output_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # written atomically; a hand-edited file is taken as none
        return {}
    return state if isinstance(state, dict) else {}


def write_state(output_dir: Path, state: dict[str, Any]) -> None:
    write_text_atomic(output_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def note_logged_steps(output_dir: Path, metrics_file: Path) -> None:
    """Before a resumed run cuts `metrics.jsonl` back to its checkpoint: remember the last step
    the interrupted run logged, so that the trackers it fed do not get those steps twice."""
    state = read_state(output_dir)
    if not state or not metrics_file.exists():
        return
    last = int(state.get("logged_up_to", -1))
    for _, row in iter_rows(metrics_file):  # a torn line (a killed run) comes as an InputError: skipped
        if isinstance(row, dict):
            with contextlib.suppress(TypeError, ValueError):
                last = max(last, int(row.get("step", -1)))
    write_state(output_dir, state | {"logged_up_to": last})


class TensorBoardTracker:
    def __init__(self, output_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # why: slow to import, and only when asked for

        # purge_step drops events of steps that are redone after a resume
        self.writer = SummaryWriter(
            str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else 0
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, output_dir: Path, config: TrainConfig, previous: dict[str, Any] | None,
                 logged_up_to: int, show_progress: bool) -> None:  # fmt: skip
        import wandb  # why: slow to import (and optional), only when asked for

        # the steps the run this one continues had logged already (-1: none)
        self.logged_up_to = logged_up_to if previous else -1
        directory = None if os.environ.get("WANDB_DIR") else str(output_dir)
        settings = wandb.Settings(console="off", silent=not show_progress)
        self.run = wandb.init(
            project=(previous or {}).get("project", config.tracker_project),
            name=config.run_name or output_dir.name,
            group=config.tracker_group,
            job_type=type(config).method,  # sft, reward-model, dpo, rl
            id=(previous or {}).get("id"),
            resume="allow" if previous else None,
            dir=directory,
            config=config.model_dump(mode="json"),
            settings=settings,
            reinit="create_new",  # a pipeline runs its trainers one after another in one process
        )
        self.state = {"id": self.run.id, "project": self.run.project, "name": self.run.name}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_up_to:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, output_dir: Path, config: TrainConfig, previous: dict[str, Any] | None,
                 logged_up_to: int, show_progress: bool) -> None:  # fmt: skip
        import trackio  # why: slow to import (and optional), only when asked for

        self.logged_up_to = logged_up_to if previous else -1  # as WandbTracker's
        self.trackio, self.show_progress = trackio, show_progress
        name = (previous or {}).get("name") or config.run_name or output_dir.name
        project = (previous or {}).get("project", config.tracker_project)
        with self._quiet():
            self.run = trackio.init(
                project=project, name=name, group=config.tracker_group, config=config.model_dump(mode="json"),
                resume="allow" if previous else "never", embed=False,
            )  # fmt: skip
        self.state = {"project": project, "name": name}

    def _quiet(self) -> contextlib.AbstractContextManager[Any]:
        """trackio prints several lines per run; with the progress bar off (--quiet) none."""
        return contextlib.nullcontext() if self.show_progress else contextlib.redirect_stdout(io.StringIO())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_up_to:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        with self._quiet():
            self.trackio.finish()


def open_trackers(
    output_dir: Path, config: TrainConfig, start_step: int, show_progress: bool
) -> list[Tracker]:
    """The trackers of `config.report_to`, continuing the runs of `trackers.json` when resuming
    (`start_step` > 0); the state file is rewritten with the runs opened."""
    check_trackers(config.report_to)
    before = read_state(output_dir) if start_step > 0 else {}
    logged_up_to = int(before.get("logged_up_to", -1))
    state: dict[str, Any] = {"logged_up_to": logged_up_to}
    trackers: list[Tracker] = []
    try:
        for name in config.report_to:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(output_dir, start_step))
            elif name == "wandb":
                wandb_tracker = WandbTracker(
                    output_dir, config, before.get("wandb"), logged_up_to, show_progress
                )
                state["wandb"] = wandb_tracker.state
                trackers.append(wandb_tracker)
            elif name == "trackio":
                trackio_tracker = TrackioTracker(
                    output_dir, config, before.get("trackio"), logged_up_to, show_progress
                )
                state["trackio"] = trackio_tracker.state
                trackers.append(trackio_tracker)
            else:  # the config's Literal keeps this out
                raise ConfigError(f"report_to: unknown tracker {name!r}")
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    if set(state) - {"logged_up_to"}:
        write_state(output_dir, state)
    elif start_step == 0:  # a new run without W&B or trackio: no stale runs to continue later
        (output_dir / STATE_FILE).unlink(missing_ok=True)
    return trackers
