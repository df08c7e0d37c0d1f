"""FSDP (version 2) against DDP on two CPU processes: step time and memory per process, SFT and DPO.

Both launch the same trainer through `accelerate launch --config_file configs/accelerate/{ddp,fsdp2}.yaml`
on the same random Llama-architecture model (built once: `--hidden`, `--layers`), the same data
(hh-harmless), batches, steps and sequence length, one thread per process; the two alternate over
`--rounds`. Step time is the wall time of an optimizer step (from the trainer's own
`train/samples_per_s`), averaged over the steps after the first. Memory per process: the
parameters it holds after training (FSDP: its shard; AdamW's two moments take twice that again),
the peak resident set (includes loading the whole model before it is sharded) and the resident
set after training (the allocator keeps freed memory, so this overstates what FSDP holds).

    .venv/bin/python benchmarks/bench_fsdp.py [--hidden 1024] [--layers 8] [--steps 6] [--rounds 2]

CPU numbers: FSDP's gathers and reduce-scatters go through gloo over shared memory, not NVLink.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")

CHILD = """
import json, os, resource, sys
import psutil, torch
torch.set_num_threads(1)
from openrlaif.training import TRAINERS
name, settings = sys.argv[1], json.loads(sys.argv[2])
config_class, train = TRAINERS[name]
result = train(config_class(**settings), show_progress=False)
local = [getattr(p, "_local_tensor", p) for p in result.model.parameters()]  # FSDP: this process's shard
record = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
          "end_rss_mib": psutil.Process().memory_info().rss // 2**20,
          "param_mib": sum(t.numel() * t.element_size() for t in local) / 2**20}
rank = os.environ.get("RANK", "0")
with open(os.path.join(settings["output_dir"], f"memory.rank{rank}.json"), "w") as fh:
    json.dump(record, fh)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(mode: str, trainer: str, model: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    settings = {
        "model": str(model), "data": "hh-harmless", "output_dir": str(out), "max_steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "learning_rate": 1e-5,
        "eval_fraction": 0.0, "save_every": 10_000, "log_every": 1, "seed": 0, "mixed_precision": "no",
        "report_to": [], "limit": args.steps * args.batch_size * 2,
    }  # fmt: skip
    child = out.parent / "child.py"
    child.write_text(CHILD, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = ROOT / "configs" / "accelerate" / f"{mode}.yaml"
    done = subprocess.run(
        [str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
         str(child), trainer, json.dumps(settings)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode} {trainer} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    global_batch = args.batch_size * 2
    seconds = [
        global_batch / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r and r["step"] > 1
    ]
    memory = [json.loads((out / f"memory.rank{r}.json").read_text()) for r in range(2)]
    return {
        "step_s": statistics.mean(seconds),
        "peak_rss_mib": max(m["peak_rss_mib"] for m in memory),
        "end_rss_mib": max(m["end_rss_mib"] for m in memory),
        "param_mib": max(m["param_mib"] for m in memory),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trainers", default="sft,dpo")
    args = parser.parse_args()

    from openrlaif.models.tiny import build_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_causal_lm(
            Path(tmp) / "model", arch="llama", vocab_size=4096, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=max(1, args.hidden // 64), seed=0,
        )  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        print(f"model: Llama architecture, hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M "
              f"parameters; 2 processes x 1 thread; batch {args.batch_size} per process, {args.max_length} tokens; "
              f"torch {torch.__version__}")  # fmt: skip
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            for trainer in args.trainers.split(","):
                for mode in ("ddp", "fsdp2") if round_ % 2 == 0 else ("fsdp2", "ddp"):
                    out = Path(tmp) / f"{trainer}-{mode}-{round_}"
                    got = run(mode, trainer, model, args, out)
                    results.setdefault((trainer, mode), []).append(got)
                    print(f"round {round_ + 1} {trainer:4s} {mode:5s}: step {got['step_s']:.3f} s, parameters "
                          f"{got['param_mib']:.0f} MiB, peak RSS {got['peak_rss_mib']} MiB, after training "
                          f"{got['end_rss_mib']} MiB per process")  # fmt: skip
        print()
        for trainer in args.trainers.split(","):
            ddp, fsdp = (
                {k: statistics.mean(r[k] for r in results[(trainer, mode)]) for k in results[(trainer, mode)][0]}
                for mode in ("ddp", "fsdp2")
            )  # fmt: skip
            print(f"{trainer}: step time FSDP/DDP {fsdp['step_s'] / ddp['step_s']:.2f}x "
                  f"({fsdp['step_s']:.3f} / {ddp['step_s']:.3f} s); parameters per process FSDP/DDP "
                  f"{fsdp['param_mib'] / ddp['param_mib']:.2f}x ({fsdp['param_mib']:.0f} / {ddp['param_mib']:.0f} MiB); "
                  f"peak RSS "
                  f"{fsdp['peak_rss_mib'] / ddp['peak_rss_mib']:.2f}x ({fsdp['peak_rss_mib']:.0f} / "
                  f"{ddp['peak_rss_mib']:.0f} MiB); after training {fsdp['end_rss_mib'] / ddp['end_rss_mib']:.2f}x "
                  f"({fsdp['end_rss_mib']:.0f} / {ddp['end_rss_mib']:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
