"""DPO training-step throughput: openrlaif's `train_dpo` against TRL's `DPOTrainer`.

Both train the same tiny GPT-2 architecture model (built locally, random weights; hidden 256,
4 layers, 4 heads, vocab 1024) on the same hh-harmless pairs with hard labels (p = 1: TRL has no
soft labels), sigmoid loss, beta 0.1, the same batch size, max length, learning rate, AdamW,
steps, threads and precision, with the reference log-probs precomputed (TRL:
`precompute_ref_log_probs=True`). The precompute time is reported separately (openrlaif: the
reference pass alone; TRL: the DPOTrainer construction, i.e. tokenizing the dataset plus the
reference pass). Throughput counts the
training steps after `--warmup` steps, from the end of one step to the end of the next (data
collation, forward, backward, optimizer step; no evaluation, no checkpoints).

TRL is a benchmark-only dependency: `pip install -e '.[bench]'` (or `pip install trl`).

    .venv/bin/python benchmarks/bench_dpo_vs_trl.py [--pairs 256] [--batch-size 8] [--max-length 256]
        [--steps 32] [--threads 2] [--dtype float32|bfloat16] [--runs ours,ours-shared,trl]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from openrlaif.data.datasets import load_pairs  # noqa: E402
from openrlaif.data.io import write_records  # noqa: E402
from openrlaif.models.tiny import build_tiny_causal_lm  # noqa: E402
from openrlaif.training import dpo  # noqa: E402
from openrlaif.training.dpo import DPOConfig  # noqa: E402


def rows(n: int) -> list[dict[str, Any]]:
    pairs = load_pairs("hh-harmless").records[:n]
    # response_a is the reply people chose
    return [{"id": p.id, "prompt": p.prompt, "chosen": p.response_a, "rejected": p.response_b} for p in pairs]


def run_ours(
    model: Path, data: Path, out: Path, args: argparse.Namespace, share_prompt: bool
) -> tuple[float, float]:
    """(reference precompute seconds, training pairs/s)."""
    config = DPOConfig(
        model=str(model), data=str(data), output_dir=str(out), max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=5e-5, warmup_ratio=0.0, lr_schedule="constant", beta=0.1,
        eval_fraction=0.0, eval_every=0, save_every=args.steps, tensorboard=False, max_grad_norm=1.0,
        mixed_precision="bf16" if args.dtype == "bfloat16" else "no", share_prompt=share_prompt,
    )  # fmt: skip
    precompute = 0.0
    original = dpo.compute_reference_logprobs

    def timed(*a: Any, **k: Any) -> torch.Tensor:  # the reference pass, train and held-out
        nonlocal precompute
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            precompute += time.perf_counter() - started

    dpo.compute_reference_logprobs = timed
    try:
        dpo.train_dpo(config, show_progress=False)
    finally:
        dpo.compute_reference_logprobs = original
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # per-step rates measured by the trainer: from the end of one step to the end of the next
    steps = [m for m in metrics if "train/samples_per_s" in m and m["step"] > args.warmup]
    seconds = sum(args.batch_size / m["train/samples_per_s"] for m in steps)
    return precompute, len(steps) * args.batch_size / seconds


def run_trl(
    model_path: Path, data: list[dict[str, Any]], out: Path, args: argparse.Namespace
) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # the completion follows the prompt after a space, as openrlaif's encoding puts it
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in data]
    )
    config = TRLDPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=5e-5, warmup_steps=0, lr_scheduler_type="constant", beta=0.1,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
        save_strategy="no", eval_strategy="no", logging_steps=10_000, report_to="none", use_cpu=True,
        bf16=args.dtype == "bfloat16", max_grad_norm=1.0, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, weight_decay=0.0,
    )  # fmt: skip

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    precompute = time.perf_counter() - started
    trainer.add_callback(StepTimes())
    trainer.train()
    timed = ends[args.warmup :]  # the end of step `warmup` to the end of the last step
    return precompute, (len(timed) - 1) * args.batch_size / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--runs",
        default="ours,ours-shared,trl",
        help="comma-separated: ours, ours-shared (share_prompt), trl",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
        model = build_tiny_causal_lm(root / "model", arch="gpt2", hidden_size=256, num_layers=4, num_heads=4)
        data = rows(args.pairs)
        data_file = root / "pairs.jsonl"
        write_records(data_file, data)
        print(
            f"{len(data)} hh-harmless pairs, batch {args.batch_size}, max_length {args.max_length}, "
            f"{args.steps} steps ({args.warmup} warm-up not timed), {args.threads} threads, {args.dtype}"
        )
        names = {"ours": "openrlaif", "ours-shared": "openrlaif share_prompt", "trl": "TRL DPOTrainer"}
        results: dict[str, list[tuple[float, float]]] = {}
        for run in args.runs.split(","):  # a name may repeat: runs alternate, sharing the machine's noise
            if run == "trl":
                result = run_trl(model, data, root / f"trl{len(results.get(run, []))}", args)
            else:
                out = root / f"{run}{len(results.get(run, []))}"
                result = run_ours(model, data_file, out, args, share_prompt=run == "ours-shared")
            results.setdefault(run, []).append(result)
            print(
                f"{names[run]:24s} reference precompute {result[0]:6.2f} s   training {result[1]:7.2f} pairs/s"
            )
        best = {run: max(rate for _, rate in rs) for run, rs in results.items()}
        print("best of each: " + ", ".join(f"{names[r]} {v:.2f} pairs/s" for r, v in best.items()))
        for run in ("ours", "ours-shared"):
            if run in best and "trl" in best:
                print(f"ratio {names[run]} / TRL (best of each): {best[run] / best['trl']:.2f}x")


if __name__ == "__main__":
    main()
