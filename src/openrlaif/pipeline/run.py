"""`openrlaif run experiment.yaml`: every stage in order, skipping what is done, resuming what was cut.

For each planned stage (stages.py), in order:
  1. its fingerprint = hash(settings, the content hashes of the outputs it reads);
  2. done with the same fingerprint and its outputs still there -> skipped;
  3. cut short (`running`/`failed` in the manifest) with the same fingerprint -> resumed: the
     trainers continue from their last checkpoint, generation and labeling from the rows already
     written;
  4. otherwise its old outputs are removed and it runs from scratch;
  5. on success its outputs' content hash is recorded for the stages after it.
Then the model cards of the trained folders are written again with the lineage and the win rates
(cards.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openrlaif.config import check_trackers
from openrlaif.data.io import write_text_atomic
from openrlaif.data.lock import one_writer
from openrlaif.errors import DiskFullError
from openrlaif.models.loading import quiet_transformers
from openrlaif.pipeline.cards import write_pipeline_cards
from openrlaif.pipeline.config import PipelineConfig
from openrlaif.pipeline.manifest import Manifest, content_hash, fingerprint
from openrlaif.pipeline.stages import Context, Stage, plan


@dataclass
class RunResult:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _remove(run_dir: Path, outputs: list[str]) -> None:
    for rel in outputs:
        path = run_dir / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_pipeline(config: PipelineConfig, show_progress: bool = True, quiet: bool = False) -> RunResult:
    quiet_transformers()  # the stages show their own progress; not a bar per weight file loaded
    run_dir = config.resolved_run_dir()
    check_trackers(config.trackers())  # a tracker that is not installed: one line before any stage
    with one_writer(run_dir):  # one pipeline per run directory: a second is refused at once
        return _run_stages(config, run_dir, show_progress, quiet)


def _run_stages(config: PipelineConfig, run_dir: Path, show_progress: bool, quiet: bool) -> RunResult:
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    stages = plan(config)
    manifest = Manifest(run_dir)
    ctx = Context(config, run_dir, show_progress)
    result = RunResult(run_dir)
    for i, stage in enumerate(stages, 1):
        inputs = {dep: manifest.stages[dep].output_hash or "" for dep in stage.deps}
        fp = fingerprint(stage.settings, inputs)
        record = manifest.stages.get(stage.name)
        label = f"[{i}/{len(stages)}] {stage.name}"
        if record and record.status == "done" and record.fingerprint == fp and _outputs_exist(run_dir, stage):
            result.skipped.append(stage.name)
            _say(f"{label}: up to date, skipped", quiet)
            continue
        resume = record is not None and record.status in ("running", "failed") and record.fingerprint == fp
        if not resume:
            _remove(run_dir, stage.outputs)
        _say(f"{label}: {'resuming' if resume else 'running'}", quiet)
        manifest.start(stage.name, fp, inputs, stage.outputs)
        try:
            summary = stage.run(ctx, resume)
        except BaseException as e:  # a stage cut by Ctrl-C is resumed by the next run, like a killed one
            # on a full disk the manifest may not take the news; left `running`, the stage resumes all the same
            with contextlib.suppress(DiskFullError):
                manifest.fail(stage.name, f"{type(e).__name__}: {e}")
            raise
        manifest.finish(
            stage.name, content_hash([run_dir / p for p in stage.hashed_outputs], run_dir), summary
        )
        (result.resumed if resume else result.ran).append(stage.name)
        _say(f"{label}: done in {manifest.stages[stage.name].seconds:.1f}s", quiet)
    write_pipeline_cards(config, run_dir)  # the model cards, with the lineage and the win rates
    result.seconds = time.perf_counter() - start
    return result


def release_memory() -> None:
    """Hand the memory a finished stage freed back to the system, so the next stage's peak does
    not stack on top of it (glibc keeps freed heap pages otherwise; the quickstart must stay
    under 4 GiB)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _outputs_exist(run_dir: Path, stage: Stage) -> bool:
    return all((run_dir / p).exists() for p in stage.hashed_outputs)


def describe_plan(config: PipelineConfig) -> list[dict[str, Any]]:
    """The stages with their status against the manifest, for `openrlaif run --dry-run`."""
    run_dir = config.resolved_run_dir()
    manifest = Manifest(run_dir) if run_dir.exists() else None
    rows: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}  # stage -> its output hash, as _run_stages would see it
    for stage in plan(config):
        record = manifest.stages.get(stage.name) if manifest else None
        inputs = {dep: hashes.get(dep, "") for dep in stage.deps}
        fp = fingerprint(stage.settings, inputs)
        fresh = bool(
            record and record.status == "done" and record.fingerprint == fp and _outputs_exist(run_dir, stage)
        )
        hashes[stage.name] = (record.output_hash or "") if fresh and record else "(changes)"
        status = "up to date" if fresh else "resume" if record and record.fingerprint == fp else "run"
        rows.append({"stage": stage.name, "status": status, "reads": stage.deps})
    return rows
