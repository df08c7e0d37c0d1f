"""AI preference labeling jobs: pairs to soft labels, responses to scores, resumably.

`label_pairs` turns pairs into labeled pairs with any judge: both orders, soft labels, the
judge's identity, rationales when chain of thought is on. Output rows are appended and fsynced
per chunk, and every single judgment goes to the SQLite cache, so a job killed at any moment
and run again skips the rows already written and re-uses the judgments already made: nothing
is redone, nothing is written twice.
"""

from __future__ import annotations

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
from openrlaif.data.records import LabeledPair, Pair, ResponseRecord, ScoredResponse
from openrlaif.errors import ConfigError
from openrlaif.judges.base import Judge
from openrlaif.labeling.shards import SHARD_FIELD, Shard, in_shard

T = TypeVar("T")


@dataclass
class JobResult:
    out: str
    total: int  # rows in the input
    resumed: int  # rows found already done in the output and skipped
    written: int  # rows written by this run
    cache_hits: int  # single judgments served from the cache in this run
    cache_misses: int  # single judgments computed in this run
    seconds: float
    skipped_invalid: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_invalid"] = len(self.skipped_invalid)
        return d


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_job(
    records: Sequence[Any], out: str | Path, chunk_size: int, judge: Judge, description: str,
    process: Callable[[Sequence[Any]], list[dict[str, Any]]], show_progress: bool,
    check_done: Callable[[set[str]], None] | None = None,
) -> JobResult:  # fmt: skip
    """Shared resumable loop: skip ids already in the output, process the rest chunk by chunk.
    The output takes one writer (`one_writer`): a second job on it is refused before it starts.
    `check_done(ids already in the output)` may refuse to go on before anything is written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(out)
    parquet = out.name.lower().endswith(".parquet")
    stream = out.with_name(out.name + ".partial.jsonl") if parquet else out  # Parquet can't append
    start = time.perf_counter()
    hits0, misses0 = (judge.cache.hits, judge.cache.misses) if judge.cache else (0, 0)
    with one_writer(out):
        with JsonlAppender(stream) as appender:
            if parquet and out.exists() and not appender.done_ids:
                appender.done_ids |= {str(r["id"]) for r in _read_any(out)}
            if check_done is not None:
                check_done(appender.done_ids)
            todo = [r for r in records if r.id not in appender.done_ids]
            resumed = len(records) - len(todo)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn())  # fmt: skip
            with Progress(*columns, disable=not show_progress, transient=True) as progress:
                task = progress.add_task(description, total=len(records), completed=resumed)
                for chunk in _chunks(todo, chunk_size):
                    appender.write(process(chunk))
                    progress.advance(task, len(chunk))
        if parquet:
            by_id = {str(r["id"]): r for r in (_read_any(out) if out.exists() else [])}
            by_id.update({str(r["id"]): r for r in read_jsonl_dicts(stream)})
            write_records(out, [by_id[r.id] for r in records if r.id in by_id])
            stream.unlink()
    hits1, misses1 = (judge.cache.hits, judge.cache.misses) if judge.cache else (0, 0)
    return JobResult(
        out=str(out), total=len(records), resumed=resumed, written=len(todo),
        cache_hits=hits1 - hits0, cache_misses=misses1 - misses0, seconds=time.perf_counter() - start,
    )  # fmt: skip


def _read_any(path: Path) -> list[dict[str, Any]]:
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl_dicts(path)


def label_pairs(
    pairs: Sequence[Pair], judge: Judge, out: str | Path, chunk_size: int = 64, show_progress: bool = True,
    shard: Shard | None = None,
) -> JobResult:  # fmt: skip
    """Label every pair (both orders, averaged) into `out` (.jsonl or .parquet), resumably. With
    `shard`, only the pairs of that shard (`labeling.shards`), each row marked `shard: "I/N"`; an
    output holding rows of other pairs (another shard, another pairs file) is refused."""
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
        judged = judge.compare_many([(p.prompt, p.response_a, p.response_b) for p in chunk])
        return [
            LabeledPair(
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
            for p, c in zip(chunk, judged, strict=True)
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
) -> JobResult:
    """d-RLAIF: score every response directly into `out`, resumably."""
    identity = judge.identity("score")

    def process(chunk: Sequence[ResponseRecord]) -> list[dict[str, Any]]:
        judged = judge.score_many([(r.prompt, r.response) for r in chunk])
        return [
            ScoredResponse(
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


def parse_labeled(row: dict[str, Any], line: int) -> LabeledPair:
    """A row of a labeled file, its labels checked (`check_labeled_row`)."""
    check_labeled_row(row)
    if not isinstance(row.get("judge"), dict) or set(row["judge"]) != {"backend", "model", "template_hash"}:
        raise RowError("field 'judge' must be {backend, model, template_hash}")
    return LabeledPair.from_dict(row)


def load_labeled(path: str | Path) -> list[LabeledPair]:
    return read_records(path, parse_labeled).records
