"""AI preference labeling jobs and how far the labeler agrees with people.

`label_pairs` turns pairs into labeled pairs with any judge: both orders, soft labels, the
judge's identity, rationales when chain of thought is on. Output rows are appended and fsynced
per chunk, and every single judgment goes to the SQLite cache, so a job killed at any moment
and run again skips the rows already written and re-uses the judgments already made: nothing
is redone, nothing is written twice.

`alignment_metrics` measures a labeler against human labels (DESIGN §2.1): accuracy of the
argmax soft label with a bootstrap 95% CI, % same position preferred after swapping the order
(position bias), P(prefers the longer response) (length bias), and expected calibration error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

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
from openrlaif.judges.base import Judge

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
) -> JobResult:  # fmt: skip
    """Shared resumable loop: skip ids already in the output, process the rest chunk by chunk.
    The output takes one writer (`one_writer`): a second job on it is refused before it starts."""
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
    pairs: Sequence[Pair], judge: Judge, out: str | Path, chunk_size: int = 64, show_progress: bool = True
) -> JobResult:
    """Label every pair (both orders, averaged) into `out` (.jsonl or .parquet), resumably."""
    identity = judge.identity("pair")

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
            ).to_dict()  # fmt: skip
            for p, c in zip(chunk, judged, strict=True)
        ]

    return _run_job(pairs, out, chunk_size, judge, "labeling pairs", process, show_progress)


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


# ---------------------------------------------------------------- metrics


def _argmax_agreement(p_a: float, human: float) -> float:
    """1 if the AI's argmax matches the human choice, 0 if not, 0.5 when the AI is exactly 50/50."""
    if p_a == 0.5:
        return 0.5
    return float((p_a > 0.5) == (human > 0.5))


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def preferred_slot(p_first: float) -> int | None:
    """Which slot (1 or 2) the labeler's argmax picks in one order; None at exactly 0.5."""
    if p_first > 0.5:
        return 1
    if p_first < 0.5:
        return 2
    return None


def same_position_preferred(p_a_ab: float, p_a_ba: float) -> bool:
    """True when the labeler picks the same *slot* in both orders (so its choice of response flipped).

    In order (A,B) slot 1 holds A, so P(slot 1) = p_a_ab; in order (B,A) slot 1 holds B, so
    P(slot 1) = 1 - p_a_ba.
    """
    slot_ab, slot_ba = preferred_slot(p_a_ab), preferred_slot(1.0 - p_a_ba)
    return slot_ab is not None and slot_ab == slot_ba


def expected_calibration_error(p_a: Sequence[float], human: Sequence[float], n_bins: int = 10) -> float:
    """ECE of the soft labels: confidence = max(p, 1-p) in [0.5, 1], binned equally; weighted
    mean over bins of |accuracy - mean confidence|."""
    p = np.asarray(p_a, dtype=np.float64)
    h = np.asarray(human, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    confidence = np.maximum(p, 1.0 - p)
    correct = np.array([_argmax_agreement(a, b) for a, b in zip(p, h, strict=True)])
    bins = np.minimum(((confidence - 0.5) / 0.5 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def prefers_longer(p_a: float, len_a: int, len_b: int) -> float | None:
    """1 if the argmax picks the longer response, 0 if the shorter, 0.5 if 50/50; None if equal length."""
    if len_a == len_b:
        return None
    if p_a == 0.5:
        return 0.5
    return float((p_a > 0.5) == (len_a > len_b))


def alignment_metrics(labeled: Sequence[LabeledPair], seed: int = 0) -> dict[str, Any]:
    """Everything `openrlaif align` reports, from labeled pairs (human labels where present)."""
    with_human = [x for x in labeled if x.human_label is not None and x.human_label != 0.5]
    agreement = [_argmax_agreement(x.p_a, x.human_label) for x in with_human]  # type: ignore[arg-type]
    low, high = bootstrap_ci(agreement, seed=seed)
    same_position = [same_position_preferred(x.p_a_ab, x.p_a_ba) for x in labeled]
    ai_longer = [
        v for x in labeled if (v := prefers_longer(x.p_a, len(x.response_a), len(x.response_b))) is not None
    ]
    human_longer = [
        v for x in with_human
        if (v := prefers_longer(x.human_label, len(x.response_a), len(x.response_b))) is not None  # type: ignore[arg-type]
    ]  # fmt: skip
    first_slot = [x.p_a_ab for x in labeled] + [1.0 - x.p_a_ba for x in labeled]
    return {
        "pairs": len(labeled),
        "pairs_with_human_label": len(with_human),
        "alignment": float(np.mean(agreement)) if agreement else None,
        "alignment_ci95": [low, high] if agreement else None,
        "same_position_preferred": float(np.mean(same_position)) if labeled else None,
        "mean_p_first_slot": float(np.mean(first_slot)) if labeled else None,
        "p_prefers_longer": float(np.mean(ai_longer)) if ai_longer else None,
        "human_p_prefers_longer": float(np.mean(human_longer)) if human_longer else None,
        "ece": expected_calibration_error([x.p_a for x in with_human], [x.human_label for x in with_human])
        if with_human
        else None,  # type: ignore[misc]
        "mean_confidence": float(np.mean([max(x.p_a, 1 - x.p_a) for x in labeled])) if labeled else None,
        "judgments_from_cache": sum(x.cached for x in labeled),
    }
