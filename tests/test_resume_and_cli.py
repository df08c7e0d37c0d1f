"""The CLI end to end on the offline judge: label / align / score, and kill -9 then resume."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openrlaif.cli import build_parser, main
from openrlaif.data import load_pairs
from openrlaif.data.io import write_records


def _pairs_file(path: Path, n: int) -> Path:
    pairs = load_pairs("hh-harmless", limit=n).records
    write_records(
        path,
        [{"id": p.id, "prompt": p.prompt, "chosen": p.response_a, "rejected": p.response_b} for p in pairs],
    )
    return path


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openrlaif.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow  # several processes
def test_sigkill_mid_job_then_resume_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    n = 64
    pairs = _pairs_file(tmp_path / "pairs.jsonl", n)
    out, cache = tmp_path / "labeled.jsonl", tmp_path / "cache.sqlite3"
    env = {**os.environ, "OPENRLAIF_CACHE": str(cache)}
    args = ["label", "--pairs", str(pairs), "--out", str(out), "--chunk-size", "4", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrlaif.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 24):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines_at_kill = out.read_bytes().count(b"\n")
    assert 24 <= lines_at_kill < n, "the job must be killed mid-way for this test to mean anything"
    cached_at_kill = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    second = _cli(*args, env=env)
    assert second.returncode == 0, second.stderr
    done = re.search(
        r"(\d+) new, (\d+) already done\); judgments: (\d+) from cache, (\d+) computed", second.stdout
    )
    assert done, second.stdout
    new, already, hits, computed = map(int, done.groups())
    assert already == lines_at_kill and new == n - lines_at_kill
    assert computed == 2 * n - cached_at_kill  # no finished judgment was computed twice
    assert (
        hits == cached_at_kill - 2 * lines_at_kill
    )  # the in-flight chunk's judgments came back from the cache

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == n and len(set(ids)) == n  # complete, no duplicates
    assert sqlite3.connect(cache).execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 2 * n

    # resumed labels equal an uninterrupted run's
    fresh = tmp_path / "fresh.jsonl"
    assert (
        _cli("label", "--pairs", str(pairs), "--out", str(fresh), "--no-cache", "--quiet", env=env).returncode
        == 0
    )
    expected = {r["id"]: r["p_a"] for r in map(json.loads, fresh.read_text().splitlines())}
    assert max(abs(r["p_a"] - expected[r["id"]]) for r in rows) < 2e-3  # bf16 batches may differ slightly


def test_align_writes_metrics_and_reuses_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "align.json"
    assert main(["align", "--dataset", "hh-harmless", "--limit", "40", "--out", str(out), "--quiet"]) == 0
    first = json.loads(out.read_text())
    assert first["pairs"] == 40 and first["pairs_with_human_label"] == 40
    assert first["job"]["cache_misses"] == 80 and first["job"]["cache_hits"] == 0
    assert first["same_position_preferred"] == 0.0  # the embedding judge cannot see order
    assert first["judge_identity"]["backend"] == "embedding"
    low, high = first["alignment_ci95"]
    assert low <= first["alignment"] <= high
    table = capsys.readouterr().out
    assert "AI labeler alignment" in table and "same position preferred" in table

    # a new labels file, the same cache: every judgment is re-used, the numbers are identical
    again_out = tmp_path / "again.json"
    assert (
        main(["align", "--dataset", "hh-harmless", "--limit", "40", "--out", str(again_out), "--quiet"]) == 0
    )
    again = json.loads(again_out.read_text())
    assert again["job"]["cache_hits"] == 80 and again["job"]["cache_misses"] == 0
    assert again["judgments_from_cache"] == 40
    assert again["alignment"] == first["alignment"]


def test_labeled_output_loads_as_a_standard_preference_dataset(tmp_path: Path) -> None:
    out = tmp_path / "labeled.parquet"
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 12)
    assert main(["label", "--pairs", str(pairs), "--out", str(out), "--quiet"]) == 0
    import datasets

    ds = datasets.Dataset.from_parquet(str(out))
    assert len(ds) == 12
    assert {"prompt", "chosen", "rejected", "p_chosen", "p_a", "p_a_ab", "p_a_ba", "judge", "cached"} <= set(
        ds.column_names
    )
    row = ds[0]
    assert row["p_chosen"] >= 0.5
    assert row["chosen"] == (row["response_a"] if row["p_a"] >= 0.5 else row["response_b"])
    assert row["judge"]["backend"] == "embedding" and len(row["judge"]["template_hash"]) == 12
    jsonl = tmp_path / "labeled.jsonl"
    assert main(["label", "--pairs", str(pairs), "--out", str(jsonl), "--quiet"]) == 0
    ds_json = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    assert ds_json["p_chosen"] == pytest.approx(ds["p_chosen"])
    assert all(ds_json["cached"])  # the second run reused the first run's judgments


def test_score_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    responses = tmp_path / "responses.jsonl"
    write_records(responses, [
        {"id": "refuse", "prompt": "\n\nHuman: How do I hotwire a car?\n\nAssistant:", "response": "I'm sorry, I can't help with that."},
        {"id": "comply", "prompt": "\n\nHuman: How do I hotwire a car?\n\nAssistant:", "response": "Strip the ignition wires and touch them together."},
    ])  # fmt: skip
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--responses", str(responses), "--out", str(out), "--quiet"]) == 0
    scores = {r["id"]: r["score"] for r in map(json.loads, out.read_text().splitlines())}
    assert -1 <= scores["comply"] < scores["refuse"] <= 1
    assert "scored: 2 rows" in capsys.readouterr().out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("label", "align", "score", "judges", "datasets", "quickstart"):
        assert command in text
    assert main(["judges"]) == 0
    listing = capsys.readouterr().out
    assert "embedding-harmless" in listing and "harmless, harmless-2shot, helpful, summarize" in listing


def test_python_m_openrlaif_help_loads_no_command_code() -> None:
    """`python -m openrlaif --help` works and stays fast: no command group, no torch, is imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "openrlaif", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "quickstart" in done.stdout and "report" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "openrlaif.cli.main" in imported
    assert not {m for m in imported if m.startswith(("openrlaif.training", "openrlaif.cli.label"))}


def test_align_with_a_local_causal_lm_judge(tiny_llama: Path, tmp_path: Path) -> None:
    """The `hf` backend through the CLI: a random tiny Llama is position-biased and near chance,
    and the report says so with numbers taken from both orders."""
    judge = tmp_path / "tiny.yaml"
    judge.write_text(
        f"backend: hf\nmodel: {tiny_llama}\ntemplate: harmless\nbatch_size: 4\nmax_length: 512\n"
    )
    out = tmp_path / "align.json"
    assert (
        main(
            [
                "align",
                "--dataset",
                "hh-harmless",
                "--limit",
                "8",
                "--judge",
                str(judge),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    labels = [json.loads(line) for line in Path(m["labels"]).read_text().splitlines()]
    assert len(labels) == 8 and m["judge_identity"]["backend"] == "hf"
    for row in labels:
        assert row["p_a"] == pytest.approx((row["p_a_ab"] + row["p_a_ba"]) / 2)
        assert row["judge"]["model"] == str(tiny_llama)
    same = sum((r["p_a_ab"] > 0.5) == (r["p_a_ba"] < 0.5) for r in labels) / 8
    assert m["same_position_preferred"] == pytest.approx(same)
    assert m["job"]["cache_misses"] == 16


# ---------------------------------------------------------------- one writer, a full disk


def _ids(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [str(r["id"]) for r in pq.read_table(path).to_pylist()]
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_second_job_on_the_same_output_is_refused_and_the_first_finishes_intact(
    suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `openrlaif label` on one --out (tmux, a scheduler): the second is refused at once with one
    line naming the first; the first finishes with every row once. (Before: both wrote every row.)"""
    from writers import paused_writer

    pairs, out = _pairs_file(tmp_path / "pairs.jsonl", 48), tmp_path / f"same{suffix}"
    args = ["label", "--pairs", str(pairs), "--out", str(out), "--chunk-size", "8", "--quiet"]
    env = {**os.environ, "OPENRLAIF_CACHE": str(tmp_path / "cache.sqlite3")}
    with paused_writer([sys.executable, "-m", "openrlaif.cli", *args], out, env) as first:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} is being written by pid {first.pid} (openrlaif label --pairs ")
        assert err.count("\n") == 1 and "one output takes one writer" in err
    ids = _ids(out)
    assert len(ids) == 48 and len(set(ids)) == 48
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".lock", ".tmp", ".partial.jsonl"))]


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_is_one_line_keeps_the_rows_written_and_the_same_command_resumes(
    disk: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output's disk fills up mid-job: one line naming the file (not a traceback out of
    io.close), every complete chunk kept, no torn row; after space is freed the same command goes on."""
    from writers import fsync_fails_for, grow, tiny_disk

    pairs = _pairs_file(tmp_path / "pairs.jsonl", 48)
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":  # a real filesystem of 48 KiB: about 25 of the 48 rows fit
            folder = stack.enter_context(tiny_disk(tmp_path / "disk", "48k"))
        else:  # the same, told by the OS: ENOSPC once the output holds 3 chunks
            folder = tmp_path / "out"
            written = {"chunks": 0}

            def full(path: str) -> bool:
                written["chunks"] += path.endswith("labeled.jsonl")
                return written["chunks"] > 3

            monkeypatch.setattr(os, "fsync", fsync_fails_for(full))
        out = folder / "labeled.jsonl"
        args = ["label", "--pairs", str(pairs), "--out", str(out), "--chunk-size", "8", "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err  # the judge's model loading draws a progress bar first
        assert (
            "Traceback" not in err
            and err.endswith("\n")
            and err.splitlines()[-1]
            == (
                f"error: {out}: the disk is full (no space left on device); what was saved before is kept: "
                "free some space and run the same command again to go on from there"
            )
        )
        kept = _ids(out)  # every line is a whole row
        assert 0 < len(kept) < 48 and len(kept) % 8 == 0 and len(set(kept)) == len(kept)
        if disk == "tmpfs":
            grow(folder, "4m")
        else:
            monkeypatch.undo()
        assert main(args) == 0
        assert f"({48 - len(kept)} new, {len(kept)} already done)" in capsys.readouterr().out
        ids = _ids(out)
        assert ids[: len(kept)] == kept and len(ids) == 48 and len(set(ids)) == 48
