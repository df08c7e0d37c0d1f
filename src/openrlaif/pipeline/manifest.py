"""The run's manifest: for each stage, what went in (a fingerprint), what came out, and its status.

A stage's fingerprint hashes its own settings and the content hashes of the outputs it reads.
Re-running the pipeline skips a stage whose fingerprint is unchanged and whose status is `done`,
resumes one that was `running` when the process died (same fingerprint), and re-runs from
scratch one whose fingerprint changed (its old outputs are removed first). Because an output's
content hash is what the next stage's fingerprint sees, a re-run stage whose outputs come out
byte-identical does not force the stages after it to run again.

manifest.json is rewritten atomically (temp file + rename) at every status change.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from openrlaif.cards import CARD_FILE
from openrlaif.data.io import write_text_atomic
from openrlaif.data.lock import LOCK_SUFFIX

Status = Literal["running", "done", "failed"]

MANIFEST_FILE = "manifest.json"


def fingerprint(settings: Any, inputs: dict[str, str]) -> str:
    """sha256 of a stage's settings (JSON, keys sorted) and its inputs' content hashes."""
    text = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(paths: list[Path], root: Path) -> str:
    """sha256 over files (every file under a folder), named relative to `root`, in sorted order.
    Checkpoints and logs inside a trainer's folder are left out: only what later stages read counts.
    So are a folder's model card (`README.md`): documentation, re-written after the evaluations."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():  # a lock file left by a killed job says nothing about the outputs
            files += [
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.endswith(LOCK_SUFFIX) and p.name != CARD_FILE
            ]
        elif path.exists():
            files.append(path)
        else:
            digest.update(f"missing:{path.relative_to(root)}".encode())
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class StageRecord:
    status: Status
    fingerprint: str
    inputs: dict[str, str]  # stage it reads from -> that stage's output hash
    outputs: list[str]  # paths relative to the run directory
    output_hash: str | None = None
    started: float = 0.0
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # a few numbers the stage reported
    error: str | None = None


class Manifest:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / MANIFEST_FILE
        self.stages: dict[str, StageRecord] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.stages = {name: StageRecord(**record) for name, record in data.get("stages", {}).items()}

    def save(self) -> None:
        data = {"stages": {name: asdict(record) for name, record in self.stages.items()}}
        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def start(self, name: str, fp: str, inputs: dict[str, str], outputs: list[str]) -> None:
        self.stages[name] = StageRecord("running", fp, inputs, outputs, started=time.time())
        self.save()

    def finish(self, name: str, output_hash: str, summary: dict[str, Any]) -> None:
        record = self.stages[name]
        record.status, record.output_hash, record.summary = "done", output_hash, summary
        record.seconds = time.time() - record.started
        self.save()

    def fail(self, name: str, error: str) -> None:
        record = self.stages[name]
        record.status, record.error = "failed", error
        record.seconds = time.time() - record.started
        self.save()
