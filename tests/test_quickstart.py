"""End to end: `openrlaif quickstart --tiny` through the installed command, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the whole quickstart (scripts/check.sh --fast leaves it out)

STAGES = [
    "align",
    "sft:sft",
    "candidates",
    "label",
    "reward_model",
    "rl:rlaif",
    "rl:drlaif",
    "eval:rlaif-vs-sft",
    "eval:drlaif-vs-sft",
    "eval:drlaif-vs-rlaif",
    "report",
]


def test_quickstart_tiny_runs_every_stage_and_reports_real_numbers(tmp_path: Path) -> None:
    run_dir = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [
        sys.executable,
        "-m",
        "openrlaif.cli",
        "quickstart",
        "--tiny",
        "--run-dir",
        str(run_dir),
        "--quiet",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(manifest) == STAGES and all(s["status"] == "done" for s in manifest.values())
    summary = json.loads((run_dir / "eval/rlaif-vs-sft/eval.json").read_text())
    win = summary["win_rate"]
    assert win["n"] == 12 and win["wins"] + win["ties"] + win["losses"] == 12
    assert win["ci95"][0] <= win["value"] <= win["ci95"][1]
    out = done.stdout
    assert "rlaif vs sft" in out and f"{100 * win['value']:.1f}%" in out
    assert "labeler vs humans" in out and "alignment" in out and "report:" in out
    # d-RLAIF: the judge's score as the reward, a second policy, against SFT and head to head
    assert "drlaif vs sft" in out and "drlaif vs rlaif" in out
    drlaif = json.loads((run_dir / "eval/drlaif-vs-sft/eval.json").read_text())["win_rate"]
    assert f"{100 * drlaif['value']:.1f}%" in out
    assert yaml.safe_load((run_dir / "drlaif" / "config.yaml").read_text())["reward"]["type"] == "judge_score"
    # the reward model's held-out accuracy against the judge's labels, with its verdict
    rm = [json.loads(line) for line in (run_dir / "rm/metrics.jsonl").read_text().splitlines()]
    final = [r for r in rm if "eval/accuracy" in r][-1]
    assert "held-out accuracy" in out and f"{100 * final['eval/accuracy']:.1f}%" in out
    assert "The reward model (rm/) learned the labels" in out or "The reward model (rm/) did not learn" in out
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "rlaif" in html

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # resumes: all done
    assert again.returncode == 0 and "0 stage(s) run, 0 resumed, 11 up to date" in again.stdout
