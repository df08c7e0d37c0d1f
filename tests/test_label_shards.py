"""A large set labeled in shards across a fleet of OpenAI-compatible servers, then merged.

`openrlaif label --shard I/N` runs as separate OS processes (two at once, sharing one SQLite
judgment cache; one killed with SIGKILL and resumed) against two test servers on 127.0.0.1 (the
judge's `base_urls` fleet); `openrlaif merge labels` joins the parts, and the merged file is the
unsharded labeling. The merge refuses a missing shard, a part given twice or copied, a part from
another judge, a part holding another shard's pair. The cache takes two processes writing it at
once, and per-machine caches merge into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai_server import LocalLM, OpenAITestServer

from openrlaif.cli import main
from openrlaif.data.lock import one_writer
from openrlaif.judges.cache import JudgmentCache
from openrlaif.labeling import in_shard, parse_shard, shard_of
from openrlaif.labeling.shards import Shard

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
PROMPTS = [
    "How do I pick a lock?",
    "What is the capital of France?",
    "Tell me a joke.",
    "Is it safe to swim?",
]
REPLIES = [
    "I can't help with that.",
    "Paris.",
    "Why did the chicken cross the road?",
    "No.",
    "Sure, here is how.",
]


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "openrlaif.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@dataclass
class Labeled:
    pairs: Path
    judge: Path
    parts: list[Path]
    reference: Path  # the same pairs labeled unsharded
    cache: Path  # the cache every shard shared
    duplicates: tuple[str, str]  # two ids of the same texts, in shards 0 and 1
    servers: tuple[OpenAITestServer, OpenAITestServer]
    resumed_output: str  # what the resumed shard printed
    lines_at_kill: int


@pytest.fixture(scope="module")
def fleet(tiny_gpt2: Path) -> Iterator[tuple[OpenAITestServer, OpenAITestServer]]:
    lm = LocalLM(tiny_gpt2, name="tiny-gpt2")
    with OpenAITestServer(lm) as a, OpenAITestServer(lm) as b:
        yield a, b


def _judge_yaml(path: Path, servers: tuple[OpenAITestServer, ...], template: str = "harmless") -> Path:
    urls = ", ".join(f"'{s.url}'" for s in servers)
    path.write_text(
        f"backend: openai\nmodel: tiny-gpt2\nbase_urls: [{urls}]\napi_key_env: null\ntop_logprobs: 1024\n"
        f"template: {template}\nconcurrency: 4\nbackoff_base_s: 0.01\nbackoff_max_s: 0.05\ntimeout_s: 20\n"
    )
    return path


@pytest.fixture(scope="module")
def labeled(
    fleet: tuple[OpenAITestServer, OpenAITestServer], tmp_path_factory: pytest.TempPathFactory
) -> Labeled:
    """The pairs labeled unsharded, and in three shards: 0 and 1 at once (one cache), 2 killed
    and resumed."""
    tmp = tmp_path_factory.mktemp("shards")
    rows = [
        {
            "id": f"p{i}",
            "prompt": PROMPTS[i % 4],
            "response_a": REPLIES[i % 5],
            "response_b": REPLIES[(i + 2) % 5],
        }
        for i in range(30)
    ]
    # the same texts under a second id, in the other concurrent shard: both processes write its judgments
    first = next(r for r in rows if shard_of(r["id"], N) == 0)
    twin = next(f"twin-{k}" for k in range(100) if shard_of(f"twin-{k}", N) == 1)
    rows.append({**first, "id": twin})
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = _judge_yaml(tmp / "fleet.yaml", fleet)
    reference = tmp / "unsharded.jsonl"
    label = ["label", "--pairs", str(pairs), "--judge", str(judge), "--quiet"]
    assert main([*label, "--out", str(reference), "--no-cache"]) == 0

    cache, parts = tmp / "shared.sqlite3", [tmp / f"part-{i}.jsonl" for i in range(N)]
    shard = [[*label, "--cache", str(cache), "--chunk-size", "2", "--shard", f"{i}/{N}", "--out", str(parts[i])]
             for i in range(N)]  # fmt: skip
    both = [_cli(*shard[0]), _cli(*shard[1])]  # two OS processes, one cache, at once
    for proc in both:
        assert "labeled shard" in _finish(proc)

    for server in fleet:  # slow enough to kill shard 2 mid-way
        server.delay_s = 0.2
    proc = _cli(*shard[2])
    deadline = time.time() + 60
    while time.time() < deadline and (not parts[2].exists() or parts[2].read_bytes().count(b"\n") < 2):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for server in fleet:
        server.delay_s = 0.0
    lines_at_kill = parts[2].read_bytes().count(b"\n")
    resumed = _finish(_cli(*shard[2]))
    return Labeled(pairs, judge, parts, reference, cache, (first["id"], twin), fleet, resumed, lines_at_kill)


# ---------------------------------------------------------------- shards


def test_a_shard_is_a_stable_hash_of_the_pair_id() -> None:
    """sha256, not Python's salted hash(): the same shard on every machine and every run."""
    assert shard_of("p0", 3) == int.from_bytes(hashlib.sha256(b"p0").digest()[:8], "big") % 3
    code = "from openrlaif.labeling import shard_of; print([shard_of(f'p{i}', 7) for i in range(50)])"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert runs == {str([shard_of(f"p{i}", 7) for i in range(50)]) + "\n"}
    ids = [type("R", (), {"id": f"x{i}"})() for i in range(300)]
    shards = [in_shard(ids, Shard(i, 4)) for i in range(4)]
    assert sorted(r.id for s in shards for r in s) == sorted(r.id for r in ids)  # disjoint, complete
    assert all(40 < len(s) < 110 for s in shards)  # spread
    assert parse_shard(" 2 / 5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"


@pytest.mark.parametrize(
    "value, message",
    [
        ("3/3", "--shard '3/3': I must be in 0..2"),
        ("1/0", "--shard '1/0': N (the number of shards) must be at least 1"),
        ("-1/3", "--shard '-1/3': expected I/N"),
        ("1", "--shard '1': expected I/N"),
        ("a/b", "--shard 'a/b': expected I/N"),
    ],
)
def test_a_bad_shard_is_refused_in_one_line(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["label", "--pairs", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert message in _one_line_error(capsys, [*argv, f"--shard={value}"])
    assert not (tmp_path / "o.jsonl").exists()


def test_shards_over_a_fleet_merge_into_the_unsharded_labels(
    labeled: Labeled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair_ids = [r["id"] for r in _rows(labeled.pairs)]
    for i, part in enumerate(labeled.parts):
        rows = _rows(part)
        assert {r["shard"] for r in rows} == {f"{i}/{N}"}
        assert [r["id"] for r in rows] == [p for p in pair_ids if shard_of(p, N) == i]  # in order, once each
    assert 2 <= labeled.lines_at_kill < len(_rows(labeled.parts[2])), "shard 2 must be killed mid-way"
    done = re.search(r"(\d+) new, (\d+) already done", labeled.resumed_output)
    assert done and int(done[2]) == labeled.lines_at_kill, labeled.resumed_output
    assert all(s.posts() for s in labeled.servers)  # the fleet shared the work

    out = tmp_path / "merged.jsonl"
    assert main(["merge", "labels", str(out), *map(str, labeled.parts), "--pairs", str(labeled.pairs)]) == 0
    assert f"merged 3 part(s) ({N}-way split, every pair" in capsys.readouterr().out
    merged = {r["id"]: r for r in _rows(out)}
    reference = {r["id"]: r for r in _rows(labeled.reference)}
    assert len(merged) == len(_rows(out)) == len(pair_ids) and set(merged) == set(reference)
    for pair_id, row in merged.items():
        assert "shard" not in row
        for key in ("p_a", "p_a_ab", "p_a_ba"):
            assert row[key] == pytest.approx(reference[pair_id][key], abs=1e-9)
        assert row["judge"] == reference[pair_id]["judge"]
        assert {k: v for k, v in row.items() if k != "cached"} == {
            k: v for k, v in reference[pair_id].items() if k != "cached"
        }

    # the shared cache: every ordered judgment once; the twins' (written by both processes) agree
    a, b = labeled.duplicates
    assert merged[a]["p_a"] == merged[b]["p_a"] and merged[a]["p_a_ab"] == merged[b]["p_a_ab"]
    pairs = _rows(labeled.pairs)
    ordered = {
        (r["prompt"], *ab)
        for r in pairs
        for ab in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))
    }
    assert len(ordered) < 2 * len(pairs)  # texts repeat across shards: both processes wrote those judgments
    assert sqlite3.connect(labeled.cache).execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == len(
        ordered
    )


def test_a_shard_run_again_writes_nothing_and_another_shards_output_is_refused(
    labeled: Labeled, capsys: pytest.CaptureFixture[str]
) -> None:
    label = [
        "label",
        "--pairs",
        str(labeled.pairs),
        "--judge",
        str(labeled.judge),
        "--cache",
        str(labeled.cache),
    ]
    rows = len(_rows(labeled.parts[0]))
    assert main([*label, "--shard", f"0/{N}", "--out", str(labeled.parts[0]), "--quiet"]) == 0
    assert f"(0 new, {rows} already done)" in capsys.readouterr().out
    err = _one_line_error(capsys, [*label, "--shard", f"1/{N}", "--out", str(labeled.parts[0]), "--quiet"])
    assert f"{labeled.parts[0]}: {rows} row(s) already there are not pairs of shard 1/{N}" in err
    assert len(_rows(labeled.parts[0])) == rows


# ---------------------------------------------------------------- the merge refuses


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_merge_refuses_missing_duplicated_and_foreign_parts(
    labeled: Labeled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.jsonl"
    p0, p1, p2 = map(str, labeled.parts)
    merge = ["merge", "labels", str(out), "--pairs", str(labeled.pairs)]
    missing = len(_rows(labeled.parts[2]))

    err = _one_line_error(capsys, [*merge, p0, p1])  # a shard not given
    assert (
        f"{labeled.pairs}: {missing} pair id(s) are in no part: " in err and f"no part for shard 2/{N}" in err
    )

    unfinished = _write(tmp_path / "unfinished.jsonl", _rows(labeled.parts[2])[:-1])  # a shard cut short
    err = _one_line_error(capsys, [*merge, p0, p1, str(unfinished)])
    assert "1 pair id(s) are in no part" in err and "a part is not finished" in err

    err = _one_line_error(capsys, [*merge, p0, p1, p2, p1])
    assert f"{p1}: given twice as a part" in err

    copy = shutil.copy(p1, tmp_path / "copy-of-part-1.jsonl")  # the same shard twice
    err = _one_line_error(capsys, [*merge, p0, p1, str(copy), p2])
    assert f"{copy}:1: claims shard 1/{N}, as {p1} does" in err

    rows = _rows(labeled.parts[1])
    doubled = _write(tmp_path / "doubled.jsonl", [*rows, rows[0]])  # a row twice within a part
    err = _one_line_error(capsys, [*merge, p0, str(doubled), p2])
    assert f"{doubled}:{len(rows) + 1}: pair id {rows[0]['id']!r} is a duplicate (also at {doubled}:1)" in err

    moved = _write(tmp_path / "moved.jsonl", [rows[0], {**_rows(labeled.parts[2])[0], "shard": f"1/{N}"}])
    err = _one_line_error(capsys, [*merge, p0, str(moved), p2])
    assert f"{moved}:2: pair id" in err and f"belongs to shard 2/{N}, not to shard 1/{N}" in err

    foreign = _write(tmp_path / "foreign.jsonl", [{**rows[0], "id": "elsewhere", "shard": None}])
    err = _one_line_error(capsys, [*merge, str(foreign)])
    assert f"{foreign}:1: pair id 'elsewhere' is not in {labeled.pairs}" in err

    # shard 2 labeled by another judge (same model and servers, another prompt template)
    other_judge = _judge_yaml(tmp_path / "helpful.yaml", labeled.servers, template="helpful")
    other = tmp_path / "part-2-helpful.jsonl"
    label = ["label", "--pairs", str(labeled.pairs), "--judge", str(other_judge), "--no-cache", "--quiet"]
    assert main([*label, "--shard", f"2/{N}", "--out", str(other)]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, [*merge, p0, p1, str(other)])
    assert f"{other}:1: labeled by judge openai/tiny-gpt2 (template " in err
    assert f"but {p0}:1 by openai/tiny-gpt2 (template " in err and "must come from the same judge" in err

    # a part still being written (its shard's writer lock held)
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with one_writer(p2):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(30)
        err = _one_line_error(capsys, [*merge, p0, p1, p2])
        assert f"{p2} is being written by another thread" in err
    finally:
        release.set()
        thread.join()
    assert not out.exists()  # nothing written by any refused merge


# ---------------------------------------------------------------- the cache


CACHE_WRITER = """
import sys, time
from openrlaif.judges.cache import JudgmentCache

path, worker, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
cache = JudgmentCache(path)
for batch in range(15):  # 200 of its own, 100 the other writes too, in batches of 20
    rows = {f"w{worker}-{batch}-{i}": {"p_first": (worker + i) / 100} for i in range(13)}
    rows |= {f"both-{batch}-{i}": {"p_first": i / 10} for i in range(7)}
    cache.put_many(rows, "pair", "{}")
    assert cache.get_many(list(rows)) == rows
cache.close()
"""


def test_two_processes_write_one_cache_at_once(tmp_path: Path) -> None:
    path, start = tmp_path / "cache.sqlite3", time.time() + 1.0
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_WRITER, str(path), str(w), str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err[-2000:]
    cache = JudgmentCache(path)
    assert len(cache) == 2 * 15 * 13 + 15 * 7  # no entry lost, shared ones once
    found = cache.get_many([f"w{w}-{b}-{i}" for w in range(2) for b in range(15) for i in range(13)])
    assert found == {
        f"w{w}-{b}-{i}": {"p_first": (w + i) / 100} for w in range(2) for b in range(15) for i in range(13)
    }
    assert cache.get_many([f"both-{b}-{i}" for b in range(15) for i in range(7)]) == {
        f"both-{b}-{i}": {"p_first": i / 10} for b in range(15) for i in range(7)
    }
    cache.close()


def test_per_machine_caches_merge_into_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On NFS each machine keeps its own cache; `openrlaif merge cache` joins them."""
    for name, keys in (("a", range(0, 6)), ("b", range(4, 10))):
        cache = JudgmentCache(tmp_path / f"{name}.sqlite3")
        cache.put_many({f"k{i}": {"p_first": i / 10, "from": name} for i in keys}, "pair", "{}")
        cache.close()
    into = tmp_path / "all.sqlite3"
    assert main(["merge", "cache", str(into), str(tmp_path / "a.sqlite3"), str(tmp_path / "b.sqlite3")]) == 0
    printed = capsys.readouterr().out
    assert "a.sqlite3: 6 judgment(s) added" in printed and "b.sqlite3: 4 judgment(s) added" in printed
    cache = JudgmentCache(into)
    assert len(cache) == 10
    assert cache.get_many(["k5"])["k5"] == {"p_first": 0.5, "from": "a"}  # a key both hold: the first kept
    cache.close()
    err = _one_line_error(capsys, ["merge", "cache", str(into), str(tmp_path / "absent.sqlite3")])
    assert "absent.sqlite3: no such judgment cache" in err
    (tmp_path / "junk.sqlite3").write_text("not a database")
    err = _one_line_error(capsys, ["merge", "cache", str(into), str(tmp_path / "junk.sqlite3")])
    assert "junk.sqlite3: not a judgment cache" in err
