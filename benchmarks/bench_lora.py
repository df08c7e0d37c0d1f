"""SFT of Gemma 3 270M with LoRA against full fine-tuning: tokens per second and peak memory.

Both run `train_sft` on the same hh-harmless prompt + chosen-reply rows, the same batches, steps,
sequence length, threads and dtype, each in its own process (so each peak RSS is its own); the
modes alternate over `--rounds`. Throughput is the trainer's own `train/tokens_per_s` (training
tokens over the optimizer step's wall time), averaged over the steps after the first (warm-up).

    .venv/bin/python benchmarks/bench_lora.py [--model packaged:gemma-3-270m] [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, torch
torch.set_num_threads({threads})
from openrlaif.training.sft import SFTConfig, train_sft
config = SFTConfig(**json.loads(sys.argv[1]))
train_sft(config, show_progress=False)
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def run(mode: str, args: argparse.Namespace, out: Path) -> tuple[float, int]:
    settings = {
        "model": args.model, "data": "hh-harmless", "output_dir": str(out), "max_steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "learning_rate": 1e-4,
        "eval_fraction": 0.0, "save_every": 10_000, "log_every": 1, "seed": 0, "limit": args.steps * args.batch_size,
    }  # fmt: skip
    if mode == "lora":
        settings["lora"] = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(threads=args.threads), json.dumps(settings)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r and r["step"] > 1]
    return sum(rates) / len(rates), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="packaged:gemma-3-270m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, int]]] = {"full": [], "lora": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
                rate, peak = run(mode, args, Path(tmp) / f"{mode}{r}")
                results[mode].append((rate, peak))
                print(f"{mode:5s} round {r}: {rate:8.1f} tokens/s   peak RSS {peak} MiB", flush=True)
    best = {m: max(rate for rate, _ in v) for m, v in results.items()}
    peak = {m: max(p for _, p in v) for m, v in results.items()}
    print(f"best of each: full fine-tuning {best['full']:.1f} tokens/s, LoRA {best['lora']:.1f} tokens/s; "
          f"ratio LoRA / full {best['lora'] / best['full']:.2f}x")  # fmt: skip
    print(f"peak RSS: full {peak['full']} MiB, LoRA {peak['lora']} MiB ({peak['lora'] / peak['full']:.2f}x)")


if __name__ == "__main__":
    main()
