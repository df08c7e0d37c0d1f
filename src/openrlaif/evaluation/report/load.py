"""Reading a run directory: everything the report shows, and nothing is required.

What it reads (the run-directory contract, see the pipeline):
  config.yaml, manifest.json            shown as they are
  <stage>/metrics.jsonl                 training curves of every trainer folder (sft/, rm/, rl/,
                                        dpo/, or any folder holding a metrics.jsonl)
  eval/eval.json, eval/samples.jsonl    win rate, harmless rate, lengths, sample prompts
                                        (also eval/<comparison>/eval.json for several comparisons)
  align.json (+ its labels file)        the labeler against human labels

A file that is there but cannot be read is left out with a note (`RunData.notes`), never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openrlaif.data.io import iter_rows
from openrlaif.errors import OpenRLAIFError
from openrlaif.evaluation.report.text import finite, side_name

MAX_DEPTH = 3  # how deep under the run directory trainer folders and evaluations are looked for

KIND_TITLES = {"sft": "Supervised fine-tuning", "rm": "Reward model", "rl": "RL", "dpo": "DPO"}


class ReportError(OpenRLAIFError):
    """The report cannot be made (no run directory there)."""


@dataclass
class TrainerLog:
    """One trainer folder's metrics.jsonl: per key, step -> value (a resumed run logs some steps
    twice; the later row wins)."""

    folder: str  # relative to the run directory
    kind: str  # sft, rm, rl or dpo
    series: dict[str, dict[int, float]]
    bad_lines: int = 0
    status: str | None = None  # the manifest's status of the stage that wrote it

    def steps(self, key: str) -> tuple[list[float], list[float]]:
        points = sorted(self.series.get(key, {}).items())
        return [float(s) for s, _ in points], [v for _, v in points]

    def last(self, key: str) -> float | None:
        points = self.series.get(key)
        return points[max(points)] if points else None


@dataclass
class Comparison:
    """One evaluation: eval.json and its per-prompt rows."""

    path: str  # eval.json, relative to the run directory
    summary: dict[str, Any]
    samples: list[dict[str, Any]]

    @property
    def a(self) -> str:
        return side_name(self.summary, "a")

    @property
    def b(self) -> str:
        return side_name(self.summary, "b")


@dataclass
class RunData:
    root: Path
    config_text: str | None = None
    manifest: dict[str, Any] | None = None
    trainers: list[TrainerLog] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    align: dict[str, Any] | None = None
    calibration: Any = None  # (confidence, accuracy, counts) arrays from the labels file
    notes: list[str] = field(default_factory=list)  # files that were there but could not be read

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def primary(self) -> Comparison | None:
        return self.comparisons[0] if self.comparisons else None


def _read_json(path: Path, run: RunData) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.notes.append(f"{_rel(path, run.root)}: not readable JSON ({e}); left out")
        return None
    if not isinstance(data, dict):
        run.notes.append(f"{_rel(path, run.root)}: expected a JSON object; left out")
        return None
    return data


def _read_rows(path: Path, run: RunData) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSONL file; unreadable lines (e.g. the last line of a killed writer) are counted."""
    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        for _, row in iter_rows(path):
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    except OSError as e:
        run.notes.append(f"{_rel(path, run.root)}: not readable ({e}); left out")
    return rows, bad


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _walk(root: Path, filename: str) -> list[Path]:
    """Files named `filename` under root, at most MAX_DEPTH folders down, checkpoints skipped."""
    found = []
    for path in sorted(root.rglob(filename)):
        parts = path.relative_to(root).parts
        if len(parts) <= MAX_DEPTH + 1 and not any(p.startswith(("checkpoint", ".")) for p in parts[:-1]):
            found.append(path)
    return found


def _kind(keys: set[str]) -> str:
    if "train/reward_mean" in keys or "train/kl" in keys:
        return "rl"
    if "train/rewards/margin" in keys or "train/logratio" in keys:
        return "dpo"
    if "train/margin" in keys or "train/accuracy" in keys:
        return "rm"
    return "sft"


def _load_trainer(path: Path, run: RunData) -> TrainerLog:
    rows, bad = _read_rows(path, run)
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        step = finite(row.get("step"))
        if step is None:
            bad += 1
            continue
        for key, value in row.items():
            number = finite(value)
            if key != "step" and number is not None:
                series.setdefault(key, {})[int(step)] = number
    return TrainerLog(_rel(path.parent, run.root), _kind(set(series)), series, bad)


def _stage_outputs(manifest: dict[str, Any] | None) -> dict[str, tuple[int, str]]:
    """Output path (a trainer folder, an eval folder) -> (the stage's position, its status)."""
    found: dict[str, tuple[int, str]] = {}
    for i, record in enumerate(manifest_stages(manifest).values()):
        for output in record.get("outputs") or []:
            found[str(output).rstrip("/")] = (i, str(record.get("status")))
    return found


def manifest_stages(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The manifest's stage records by name (tolerates a list of {"name": ...} records)."""
    stages = (manifest or {}).get("stages") or {}
    if isinstance(stages, list):  # tolerate a list of {"name": ...} records
        stages = {str(s.get("name", i)): s for i, s in enumerate(stages) if isinstance(s, dict)}
    return {str(k): v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


def _load_calibration(align: dict[str, Any], run: RunData, bins: int = 5) -> Any:
    """Reliability diagram points from the per-pair labels written next to align.json."""
    labels = align.get("labels")
    if not labels:
        return None
    path = Path(str(labels))
    if not path.is_file():
        path = run.root / path.name  # the run directory moved, or align ran from another folder
    if not path.is_file():
        return None
    rows, _ = _read_rows(path, run)
    pairs = [
        (float(r["p_a"]), float(r["human_label"]))
        for r in rows
        if finite(r.get("p_a")) is not None and finite(r.get("human_label")) not in (None, 0.5)
    ]
    if not pairs:
        return None
    p = np.array([x for x, _ in pairs])
    human = np.array([h for _, h in pairs])
    confidence = np.maximum(p, 1 - p)
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (human > 0.5)).astype(float))
    index = np.minimum(((confidence - 0.5) / 0.5 * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    keep = counts > 0
    mean_conf = np.bincount(index, weights=confidence, minlength=bins)[keep] / counts[keep]
    accuracy = np.bincount(index, weights=correct, minlength=bins)[keep] / counts[keep]
    return mean_conf, accuracy, counts[keep]


def load_run(run_dir: str | Path) -> RunData:
    """Everything the report shows, read from the run directory; what is missing stays None/empty."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    run = RunData(root)
    if (root / "config.yaml").is_file():
        run.config_text = (root / "config.yaml").read_text(encoding="utf-8", errors="replace")
    run.manifest = _read_json(root / "manifest.json", run)
    outputs = _stage_outputs(run.manifest)
    late = (len(outputs), "")  # not in the manifest: after the stages that are
    for path in _walk(root, "metrics.jsonl"):
        trainer = _load_trainer(path, run)
        trainer.status = outputs.get(trainer.folder, late)[1] or None
        run.trainers.append(trainer)
    order = list(KIND_TITLES)
    run.trainers.sort(key=lambda t: (order.index(t.kind), outputs.get(t.folder, late)[0], t.folder))
    # the main comparison first: eval/eval.json, else the pipeline's first (config order = manifest order)
    eval_files = _walk(root, "eval.json")
    eval_files.sort(
        key=lambda p: (p != root / "eval" / "eval.json", outputs.get(_rel(p.parent, root), late)[0], str(p))
    )
    for path in eval_files:
        summary = _read_json(path, run)
        if summary is None or "win_rate" not in summary:
            continue
        samples_path = path.with_name("samples.jsonl")
        samples = _read_rows(samples_path, run)[0] if samples_path.is_file() else []
        run.comparisons.append(Comparison(_rel(path, root), summary, samples))
    run.align = _read_json(root / "align.json", run)
    if run.align is not None:
        run.calibration = _load_calibration(run.align, run)
    if not (run.config_text or run.manifest or run.trainers or run.comparisons or run.align):
        raise ReportError(
            f"{run_dir}: not a run directory (no config.yaml, manifest.json, metrics.jsonl, eval/eval.json "
            "or align.json in it)"
        )
    return run
