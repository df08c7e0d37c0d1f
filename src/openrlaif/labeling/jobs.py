"""AI preference labeling jobs: pairs to soft labels, responses to scores, resumably.

`label_pairs` turns pairs into labeled pairs with any judge: both orders, soft labels, the
judge's identity, rationales when chain of thought is on. Output rows are appended and fsynced
per chunk, and every single judgment goes to the SQLite cache, so a job killed at any moment
and run again skips the rows already written and re-uses the judgments already made: nothing
is redone, nothing is written twice.

A row the judge left undecided (an HTTP judge that could not read its labels: judges/base.py) is
not written to the output: it is listed, with the reason, in `<out>.undecided.jsonl` and counted
in the job's result. Such rows are asked again on the next run (undecided judgments are not
cached); one decided then leaves the list, and an empty list removes the file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from openrlaif.data.io import (
    JsonlAppender,
    RowError,
    check_labeled_row,
    read_jsonl_dicts,
    read_records,
    write_records,
)
from openrlaif.data.lock import one_writer
from openrlaif.data.records import JudgeIdentity, LabeledPair, Pair, ResponseRecord, ScoredResponse
from openrlaif.errors import ConfigError
from openrlaif.judges.base import Judge
from openrlaif.labeling.shards import SHARD_FIELD, Shard, in_shard

T = TypeVar("T")


@dataclass
class JobResult:
    out: str
    total: int  # rows in the input
    resumed: int  # rows found already done in the output and skipped
    written: int  # rows written by this run (undecided ones are not)
    cache_hits: int  # single judgments served from the cache in this run
    cache_misses: int  # single judgments computed in this run
    seconds: float
    undecided: int = 0  # rows of the input the judge left undecided (listed in `undecided_path(out)`)
    skipped_invalid: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_invalid"] = len(self.skipped_invalid)
        return d


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def undecided_path(out: str | Path) -> Path:
    """Where a labeling job lists the rows its judge left undecided."""
    out = Path(out)
    return out.with_name(out.name + ".undecided.jsonl")


def print_undecided(count: int, out: str | Path) -> None:
    """One warning line on stderr when a job left `count` rows of `out` undecided (none when 0)."""
    if count:
        print(
            f"warning: {count} row(s) undecided: the judge could not read their labels; listed with the reason "
            f"in {undecided_path(out)}, not in {out}. Labeling again asks for them again (set `tokenizer` or "
            'fallback_top_logprobs first: README, "Labels outside top_logprobs")',
            file=sys.stderr,
            flush=True,
        )


class UndecidedList:
    """The rows a job's judge left undecided (`undecided_path`), by id; rewritten atomically
    whenever it changes."""

    def __init__(self, out: Path) -> None:
        self.path = undecided_path(out)
        self.rows = {str(r["id"]): r for r in read_jsonl_dicts(self.path)} if self.path.exists() else {}

    def update(self, judged: Sequence[str], undecided: Sequence[dict[str, Any]]) -> None:
        """`judged`: the ids just judged (their old entries go); `undecided`: those left undecided."""
        before = dict(self.rows)
        for row_id in judged:
            self.rows.pop(row_id, None)
        self.rows.update((str(row["id"]), row) for row in undecided)
        if self.rows != before:
            if self.rows:
                write_records(self.path, list(self.rows.values()))
            else:
                self.path.unlink(missing_ok=True)


def _run_job(
    records: Sequence[Any], out: str | Path, chunk_size: int, judge: Judge, description: str,
    process: Callable[[Sequence[Any]], list[dict[str, Any]]], show_progress: bool,
    check_done: Callable[[set[str]], None] | None = None,
) -> JobResult:  # fmt: skip
    """Shared resumable loop: skip ids already in the output, process the rest chunk by chunk.
    The output takes one writer (`one_writer`): a second job on it is refused before it starts.
    `check_done(ids already in the output)` may refuse to go on before anything is written.
    `process` marks a row its judge left undecided with an `undecided` field: it goes to the
    `UndecidedList`, not the output."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(out)
    parquet = out.name.lower().endswith(".parquet")
    stream = out.with_name(out.name + ".partial.jsonl") if parquet else out  # Parquet can't append
    start = time.perf_counter()
    hits0, misses0 = (judge.cache.hits, judge.cache.misses) if judge.cache else (0, 0)
    with one_writer(out):
        undecided = UndecidedList(out)
        with JsonlAppender(stream) as appender:
            if parquet and out.exists() and not appender.done_ids:
                appender.done_ids |= {str(r["id"]) for r in _read_any(out)}
            if check_done is not None:
                check_done(appender.done_ids)
            todo = [r for r in records if r.id not in appender.done_ids]
            resumed, written = len(records) - len(todo), 0
            undecided.update(sorted(appender.done_ids & set(undecided.rows)), [])  # decided by a killed run
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn())  # fmt: skip
            with Progress(*columns, disable=not show_progress, transient=True) as progress:
                if todo and show_progress:
                    for line in judge.runs_on():
                        progress.console.print(line, highlight=False, soft_wrap=True)
                task = progress.add_task(description, total=len(records), completed=resumed)
                for chunk in _chunks(todo, chunk_size):
                    rows = process(chunk)
                    decided = [row for row in rows if "undecided" not in row]
                    appender.write(decided)
                    written += len(decided)
                    undecided.update([r.id for r in chunk], [row for row in rows if "undecided" in row])
                    progress.advance(task, len(chunk))
        if parquet:
            by_id = {str(r["id"]): r for r in (_read_any(out) if out.exists() else [])}
            by_id.update({str(r["id"]): r for r in read_jsonl_dicts(stream)})
            write_records(out, [by_id[r.id] for r in records if r.id in by_id])
            stream.unlink()
    hits1, misses1 = (judge.cache.hits, judge.cache.misses) if judge.cache else (0, 0)
    return JobResult(
        out=str(out), total=len(records), resumed=resumed, written=written,
        cache_hits=hits1 - hits0, cache_misses=misses1 - misses0, seconds=time.perf_counter() - start,
        undecided=sum(r.id in undecided.rows for r in records),
    )  # fmt: skip


def _read_any(path: Path) -> list[dict[str, Any]]:
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl_dicts(path)


def label_pairs(
    pairs: Sequence[Pair], judge: Judge, out: str | Path, chunk_size: int = 64, show_progress: bool = True,
    shard: Shard | None = None, undecided_ok: bool = True,
) -> JobResult:  # fmt: skip
    """Label every pair (both orders, averaged) into `out` (.jsonl or .parquet), resumably. With
    `shard`, only the pairs of that shard (`labeling.shards`), each row marked `shard: "I/N"`; an
    output holding rows of other pairs (another shard, another pairs file) is refused. A pair the
    judge leaves undecided is listed apart (module docstring), or, without `undecided_ok`, stops
    the job."""
    identity = judge.identity("pair")
    pairs = in_shard(pairs, shard)
    mark = {} if shard is None else {SHARD_FIELD: str(shard)}

    def check_done(done: set[str]) -> None:
        foreign = done - {p.id for p in pairs}
        if foreign:
            raise ConfigError(
                f"{out}: {len(foreign)} row(s) already there are not pairs of shard {shard} of this pairs "
                f"file (e.g. {min(foreign)!r}): written with another --shard or --pairs? Move it away or "
                "pick another --out"
            )

    def process(chunk: Sequence[Pair]) -> list[dict[str, Any]]:
        judged = judge.compare_many([(p.prompt, p.response_a, p.response_b) for p in chunk], undecided_ok)
        return [
            _undecided_row(p, identity, c.undecided)
            if c.undecided
            else LabeledPair(
                id=p.id,
                prompt=p.prompt,
                response_a=p.response_a,
                response_b=p.response_b,
                p_a=c.p_a,
                p_a_ab=c.p_a_ab,
                p_a_ba=c.p_a_ba,
                judge=identity,
                cached=c.cached,
                rationale_ab=c.rationale_ab,
                rationale_ba=c.rationale_ba,
                human_label=p.human_label,
            ).to_dict()
            | mark
            for p, c in zip(chunk, judged, strict=True)  # fmt: skip
        ]

    description = "labeling pairs" if shard is None else f"labeling shard {shard}"
    return _run_job(
        pairs, out, chunk_size, judge, description, process, show_progress,
        check_done=None if shard is None else check_done,
    )  # fmt: skip


def score_responses(
    records: Sequence[ResponseRecord],
    judge: Judge,
    out: str | Path,
    chunk_size: int = 64,
    show_progress: bool = True,
    undecided_ok: bool = True,
) -> JobResult:
    """d-RLAIF: score every response directly into `out`, resumably; an undecided score as in
    `label_pairs`."""
    identity = judge.identity("score")

    def process(chunk: Sequence[ResponseRecord]) -> list[dict[str, Any]]:
        judged = judge.score_many([(r.prompt, r.response) for r in chunk], undecided_ok)
        return [
            _undecided_row(r, identity, s.undecided)
            if s.undecided
            else ScoredResponse(
                id=r.id,
                prompt=r.prompt,
                response=r.response,
                score=s.score,
                judge=identity,
                expected_score=s.expected,
                cached=s.cached,
            ).to_dict()  # fmt: skip
            for r, s in zip(chunk, judged, strict=True)
        ]

    return _run_job(records, out, chunk_size, judge, "scoring responses", process, show_progress)


def _undecided_row(record: Pair | ResponseRecord, judge: JudgeIdentity, why: str) -> dict[str, Any]:
    """A row of the undecided list: the input row, why, and the judge."""
    return record.to_dict() | {"undecided": why, "judge": judge.to_dict()}


def parse_labeled(row: dict[str, Any], line: int) -> LabeledPair:
    """A row of a labeled file, its labels checked (`check_labeled_row`)."""
    check_labeled_row(row)
    if not isinstance(row.get("judge"), dict) or set(row["judge"]) != {"backend", "model", "template_hash"}:
        raise RowError("field 'judge' must be {backend, model, template_hash}")
    return LabeledPair.from_dict(row)


def load_labeled(path: str | Path) -> list[LabeledPair]:
    return read_records(path, parse_labeled).records
