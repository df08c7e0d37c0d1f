"""How far an AI labeler agrees with people, and its biases (DESIGN §2.1).

`alignment_metrics` measures a labeler against human labels: accuracy of the argmax soft label
with a bootstrap 95% CI, % same position preferred after swapping the order (position bias),
P(prefers the longer response) (length bias), and expected calibration error.
`measure_alignment` is the whole `openrlaif align` job: open the judge, label the pairs (both
orders, resumably), compute the metrics and write them as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openrlaif.data.datasets import load_pairs
from openrlaif.data.io import write_text_atomic
from openrlaif.data.lock import one_writer
from openrlaif.data.records import LabeledPair
from openrlaif.judges.reliability import argmax_agreement, prefers_longer, same_position_preferred
from openrlaif.labeling.jobs import label_pairs, load_labeled
from openrlaif.labeling.judge import open_judge, reading_stats


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def expected_calibration_error(p_a: Sequence[float], human: Sequence[float], n_bins: int = 10) -> float:
    """ECE of the soft labels: confidence = max(p, 1-p) in [0.5, 1], binned equally; weighted
    mean over bins of |accuracy - mean confidence|."""
    p = np.asarray(p_a, dtype=np.float64)
    h = np.asarray(human, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    confidence = np.maximum(p, 1.0 - p)
    correct = np.array([argmax_agreement(a, b) for a, b in zip(p, h, strict=True)])
    bins = np.minimum(((confidence - 0.5) / 0.5 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def alignment_metrics(labeled: Sequence[LabeledPair], seed: int = 0) -> dict[str, Any]:
    """Everything `openrlaif align` reports, from labeled pairs (human labels where present)."""
    with_human = [x for x in labeled if x.human_label is not None and x.human_label != 0.5]
    human = [x.human_label for x in with_human if x.human_label is not None]  # with_human's, as floats
    agreement = [argmax_agreement(x.p_a, h) for x, h in zip(with_human, human, strict=True)]
    low, high = bootstrap_ci(agreement, seed=seed)
    same_position = [same_position_preferred(x.p_a_ab, x.p_a_ba) for x in labeled]
    ai_longer = [
        v for x in labeled if (v := prefers_longer(x.p_a, len(x.response_a), len(x.response_b))) is not None
    ]
    human_longer = [
        v for x, h in zip(with_human, human, strict=True)
        if (v := prefers_longer(h, len(x.response_a), len(x.response_b))) is not None
    ]  # fmt: skip
    first_slot = [(x.p_a_ab + 1.0 - x.p_a_ba) / 2.0 for x in labeled]  # P(slot 1), both orders of a pair

    def ci(values: Sequence[float]) -> list[float] | None:  # a bootstrap over pairs
        return list(bootstrap_ci(values, seed=seed)) if values else None

    return {
        "pairs": len(labeled),
        "pairs_with_human_label": len(with_human),
        "alignment": float(np.mean(agreement)) if agreement else None,
        "alignment_ci95": [low, high] if agreement else None,
        "same_position_preferred": float(np.mean(same_position)) if labeled else None,
        "same_position_preferred_ci95": ci([float(v) for v in same_position]),
        "mean_p_first_slot": float(np.mean(first_slot)) if labeled else None,
        "mean_p_first_slot_ci95": ci(first_slot),
        "p_prefers_longer": float(np.mean(ai_longer)) if ai_longer else None,
        "p_prefers_longer_ci95": ci(ai_longer),
        "human_p_prefers_longer": float(np.mean(human_longer)) if human_longer else None,
        "ece": expected_calibration_error([x.p_a for x in with_human], human) if with_human else None,
        "mean_confidence": float(np.mean([max(x.p_a, 1 - x.p_a) for x in labeled])) if labeled else None,
        "judgments_from_cache": sum(x.cached for x in labeled),
    }


# ---------------------------------------------------------------- the align job


@dataclass
class AlignmentResult:
    """What `measure_alignment` wrote: the metrics (also in `out`, as JSON) and the labels file."""

    metrics: dict[str, Any]  # alignment_metrics plus dataset, judge, labels, job counters
    out: Path
    labels: Path
    source_rows_skipped: int  # rows of the dataset that were not usable pairs


def measure_alignment(
    dataset: str, judge: str, out: str | Path, *, labels_out: str | Path | None = None, limit: int | None = None,
    skip_invalid: bool = False, seed: int = 0, cache: str | None = None, no_cache: bool = False,
    chunk_size: int = 64, show_progress: bool = True,
) -> AlignmentResult:  # fmt: skip
    """Label `dataset`'s pairs (a built-in name or a pairs file with human labels) with `judge` (a
    shipped name or YAML file) into `labels_out` (default: beside `out`, <name>.labels.jsonl;
    re-running resumes), and write the alignment metrics to `out`. `seed`: the bootstrap's."""
    read = load_pairs(dataset, skip_invalid=skip_invalid, limit=limit)
    out = Path(out)
    labels_path = Path(labels_out) if labels_out else out.with_name(out.stem + ".labels.jsonl")
    with one_writer(labels_path):  # refused before the judge is loaded when another job writes it
        opened = open_judge(judge, cache, no_cache)
        try:
            job = label_pairs(
                read.records, opened, labels_path, chunk_size=chunk_size, show_progress=show_progress
            )
            readings = reading_stats(opened)
        finally:
            opened.close()
    wanted = {p.id for p in read.records}
    labeled = [x for x in load_labeled(labels_path) if x.id in wanted]
    metrics = alignment_metrics(labeled, seed=seed)
    metrics.update(
        dataset=dataset, judge=judge, judge_identity=opened.identity("pair").to_dict(), labels=str(labels_path),
        source_rows_skipped=len(read.skipped), job=job.to_dict() | ({"readings": readings} if readings else {}),
    )  # fmt: skip
    write_text_atomic(out, json.dumps(metrics, indent=2) + "\n")
    return AlignmentResult(metrics, out, labels_path, len(read.skipped))
