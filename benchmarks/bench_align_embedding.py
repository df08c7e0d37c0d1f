"""`openrlaif align` with the embedding judge on all shipped HH harmless pairs, timed end to end.

Target (issue 2): under 60 s on 2 CPU cores, cold cache, model load included. Side by side with
the straightforward use of sentence-transformers for the same judge: each pair, each order,
embedded on its own in fp32 (no de-duplication of texts, no batching across pairs, no bf16).
Both compute the same soft labels; the script prints both times, the ratio, and the largest
difference between the two sets of labels.

    .venv/bin/python benchmarks/bench_align_embedding.py [--baseline-pairs 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_ours(out_dir: Path) -> tuple[float, dict]:
    env = {**os.environ, "OPENRLAIF_CACHE": str(out_dir / "cache.sqlite3")}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "openrlaif.cli", "align", "--dataset", "hh-harmless", "--out", str(out_dir / "align.json"), "--quiet"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, json.loads((out_dir / "align.json").read_text())


def run_baseline(n_pairs: int) -> tuple[float, list[float]]:
    """The straightforward way: per pair and order, encode the texts one call at a time, fp32."""
    import torch
    from sentence_transformers import SentenceTransformer

    from openrlaif.config import load_judge_config
    from openrlaif.data import load_pairs
    from openrlaif.judges.embedding import last_human_turn
    from openrlaif.models.names import resolve_model_path

    cfg = load_judge_config("embedding-harmless")
    pairs = load_pairs("hh-harmless", limit=n_pairs).records
    start = time.perf_counter()
    model = SentenceTransformer(resolve_model_path(cfg.model), device="cpu")
    rubric = model.encode([cfg.rubric], normalize_embeddings=True)[0]

    def s(prompt: str, response: str) -> float:
        r, q = model.encode([response, last_human_turn(prompt)], normalize_embeddings=True)
        return float(r @ rubric - cfg.prompt_weight * (r @ q))

    labels = []
    with torch.inference_mode():
        for p in pairs:
            p_ab = 1 / (
                1 + math.exp(-(s(p.prompt, p.response_a) - s(p.prompt, p.response_b)) / cfg.temperature)
            )
            p_ba = 1 / (
                1 + math.exp(-(s(p.prompt, p.response_b) - s(p.prompt, p.response_a)) / cfg.temperature)
            )
            labels.append((p_ab + 1 - p_ba) / 2)
    return time.perf_counter() - start, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--baseline-pairs",
        type=int,
        default=300,
        help="pairs the baseline runs on (its time is scaled to all)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, metrics = run_ours(Path(tmp))
        ours_labels = {
            json.loads(line)["id"]: json.loads(line)["p_a"]
            for line in Path(metrics["labels"]).read_text().splitlines()
        }
    n = metrics["pairs"]
    base_s, base_labels = run_baseline(args.baseline_pairs)
    base_full = base_s * n / args.baseline_pairs
    from openrlaif.data import load_pairs

    ids = [p.id for p in load_pairs("hh-harmless", limit=args.baseline_pairs).records]
    diff = max(abs(ours_labels[i] - b) for i, b in zip(ids, base_labels, strict=True))
    print(f"pairs: {n}; threads: {os.cpu_count()} cores")
    print(
        f"openrlaif align (cold cache, process start and model load included): {ours_s:.1f} s  ({n / ours_s:.1f} pairs/s)"
    )
    print(f"straightforward sentence-transformers, fp32, per pair and order: {base_s:.1f} s on {args.baseline_pairs} pairs"
          f" -> {base_full:.1f} s scaled to {n}  ({args.baseline_pairs / base_s:.1f} pairs/s)")  # fmt: skip
    print(f"speed ratio (openrlaif / straightforward): {base_full / ours_s:.2f}x")
    print(f"max |soft label difference| on the shared pairs: {diff:.4f} (bf16 vs fp32)")
    print(
        f"alignment with human labels: {100 * metrics['alignment']:.1f}%  CI95 {np.round(np.array(metrics['alignment_ci95']) * 100, 1).tolist()}"
    )
    print(f"target: under 60 s -> {'met' if ours_s < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
