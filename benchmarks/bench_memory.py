"""Peak memory and step time of SFT and RL (RLOO) with LoRA on a large-vocabulary model
(Gemma 3 270M: 262,144 tokens), openrlaif against TRL (`SFTTrainer`, `RLOOTrainer`).

The large vocabulary is the point: a training step's LM-head logits are positions x vocabulary,
1.5 GiB of float32 for 8 x 192 positions, and a plain backward pass holds several copies.
openrlaif projects the head `logits_chunk_mib` at a time and recomputes each chunk in the
backward pass (models/logprobs.py; `--chunk-mib 0` turns it off for comparison). TRL's SFT computes
the model's own loss over whole logits; with `use_liger_kernel` (`--liger`) it would use Liger's
fused linear cross-entropy, whose Triton kernels need a GPU: where liger-kernel is not installed or
cannot run, that side is reported as not run, with the reason.

Both sides: the same model folder, the same LoRA (r 16, alpha 32, every linear layer but the
head), float32 (no autocast), AdamW at a constant learning rate, no clipping differences
(max_grad_norm 1.0), no evaluation, no checkpoint inside the timed steps, 2 threads.
- SFT: the same prompt/completion rows (hh-harmless train part: the prompt and the reply people
  chose), `--batch-size` rows per step, at most `--max-length` tokens, loss on completion tokens
  only (TRL's default for prompt/completion data; openrlaif's SFT).
- RL: RLOO, `--prompts` prompts x K samples per step, `--max-new-tokens`, temperature 0.9, β 0.05,
  the same deterministic reward of the text (tanh of a quarter of the count of " the"), no
  gradient checkpointing (the Gemma template's setting; TRL's RLOOConfig default is on, turned
  off here for both).

Each run is its own process, started alternately (`--runs`); its peak memory is the process's RSS
high-water mark (VmHWM: the model, the optimizer, the data, everything), its step time the median
over the steps after `--warmup`.

TRL is a benchmark-only dependency: `pip install -e '.[bench]'`.

    .venv/bin/python benchmarks/bench_memory.py [--model packaged:gemma-3-270m] [--tasks sft,rl]
        [--runs ours,trl,ours,trl] [--steps 4] [--warmup 1] [--batch-size 8] [--max-length 192]
        [--prompts 4] [--k 4] [--max-new-tokens 48] [--chunk-mib 256] [--liger] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

KEYWORD = " the"
LORA = {"r": 16, "alpha": 32.0}
LEARNING_RATE = 1e-4


def reward_of(text: str) -> float:
    return math.tanh(text.count(KEYWORD) / 4)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class StepClock:
    """The wall time of each training step, from one step's end to the next's."""

    def __init__(self) -> None:
        self.ends: list[float] = [time.perf_counter()]

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def median_after(self, warmup: int) -> float:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][warmup:]
        return statistics.median(steps)


# ---------------------------------------------------------------- openrlaif


def ours_sft(args: argparse.Namespace, root: Path, out: Path) -> float:
    from openrlaif.training.sft import SFTConfig, train_sft

    config = SFTConfig(
        model=str(root / "model"), data=str(root / "sft.jsonl"), output_dir=str(out), max_steps=args.steps,
        batch_size=args.batch_size, max_length=args.max_length, learning_rate=LEARNING_RATE,
        lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, eval_every=0, save_every=args.steps,
        report_to=[], mixed_precision="no", chat_template="off", group_by_length=False, seed=0,
        lora={"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"},
        logits_chunk_mib=args.chunk_mib or None,
    )  # fmt: skip
    train_sft(config, show_progress=False)
    return _median_step_seconds(out, args.warmup, args.batch_size)


def ours_rl(args: argparse.Namespace, root: Path, out: Path) -> float:
    from openrlaif.judges.base import Judge, ScoreJudgment
    from openrlaif.training.rl import RLConfig, train_rl

    class CountJudge(Judge):
        backend = "count"

        @property
        def model_name(self) -> str:
            return "count"

        def fingerprint(self, kind: str) -> dict[str, Any]:
            return {"backend": self.backend, "keyword": KEYWORD}

        def judge_orders(self, items: Sequence[Any]) -> list[Any]:
            raise NotImplementedError("a pointwise reward: only score_responses is used")

        def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
            return [ScoreJudgment(score=reward_of(r)) for _, r in items]

    config = RLConfig(
        model=str(root / "model"), data=str(root / "prompts.jsonl"), output_dir=str(out), algorithm="rloo",
        reward={"type": "judge_score", "judge": "count"}, max_steps=args.steps, batch_size=args.prompts,
        num_samples=args.k, max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, beta=0.05,
        generation_batch_size=args.prompts * args.k, learning_rate=LEARNING_RATE, lr_schedule="constant",
        warmup_ratio=0.0, max_grad_norm=1.0, mixed_precision="no", report_to=[], save_every=args.steps,
        chat_template="off", seed=0, gradient_checkpointing=False,
        lora={"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"},
        logits_chunk_mib=args.chunk_mib or None,
    )  # fmt: skip
    train_rl(config, show_progress=False, judge=CountJudge())
    return _median_step_seconds(out, args.warmup, args.prompts * args.k)


def _median_step_seconds(out: Path, warmup: int, samples_per_step: int) -> float:
    """From the trainer's own per-step rates (end of one step to the end of the next)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r and r["step"] > warmup]
    return statistics.median(samples_per_step / rate for rate in rates)


# ---------------------------------------------------------------- TRL


def _trl_lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM",
                      lora_dropout=0.0)  # fmt: skip


def _trl_common(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out), max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", eval_strategy="no",
        logging_steps=10_000, report_to="none", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, use_liger_kernel=args.liger,
    )  # fmt: skip


def trl_sft(args: argparse.Namespace, root: Path, out: Path) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    rows = [json.loads(line) for line in (root / "sft.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in rows])
    config = SFTConfig(per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                       gradient_checkpointing=False, packing=False, **_trl_common(args, out))  # fmt: skip
    clock = StepClock()

    class Ticks(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_trl_lora())  # fmt: skip
    trainer.add_callback(Ticks())
    clock.ends = []
    trainer.train()
    return clock.median_after(args.warmup - 1)


def trl_rl(args: argparse.Namespace, root: Path, out: Path) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])

    def count_reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [reward_of(c.strip()) for c in completions]

    n = args.prompts * args.k  # TRL's batch counts completions
    config = RLOOConfig(
        per_device_train_batch_size=n, num_generations=args.k, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=0.9, top_p=1.0, beta=0.05,
        log_completions=False, gradient_checkpointing=False, **_trl_common(args, out),
    )  # fmt: skip
    clock = StepClock()

    class Ticks(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

    trainer = RLOOTrainer(model=model, reward_funcs=count_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=_trl_lora())  # fmt: skip
    trainer.add_callback(Ticks())
    clock.ends = []
    trainer.train()
    return clock.median_after(args.warmup - 1)


RUNS = {("ours", "sft"): ours_sft, ("ours", "rl"): ours_rl, ("trl", "sft"): trl_sft, ("trl", "rl"): trl_rl}


def liger_problem() -> str | None:
    """Why TRL cannot run with Liger's kernels here, or None."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not installed ({e})"
    import torch

    if not torch.cuda.is_available():
        return "liger-kernel's Triton kernels need a GPU; this machine has none"
    return None


# ---------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    out = root / f"{args.side}-{args.task}-{time.time_ns()}"
    seconds = RUNS[(args.side, args.task)](args, root, out)
    print("RESULT " + json.dumps({"step_s": seconds, "peak_rss_mib": peak_rss_mib()}), flush=True)


def prepare(root: Path, args: argparse.Namespace) -> None:
    import shutil

    from openrlaif.data.datasets import load_pairs
    from openrlaif.data.io import write_records
    from openrlaif.models.names import resolve_model_path

    shutil.copytree(resolve_model_path(args.model), root / "model")
    pairs = load_pairs("hh-harmless:train").records
    sft = [
        {"id": p.id, "prompt": p.prompt, "completion": p.response_a}
        for p in pairs
        if isinstance(p.prompt, str)
    ]
    write_records(root / "sft.jsonl", sft[: args.batch_size * args.steps])
    write_records(root / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"][-600:]} for r in sft[:64]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:gemma-3-270m")
    parser.add_argument("--tasks", default="sft,rl")
    parser.add_argument("--runs", default="ours,trl,ours,trl", help="comma-separated: ours, trl (may repeat)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="SFT rows per step")
    parser.add_argument("--max-length", type=int, default=192, help="SFT tokens per row")
    parser.add_argument("--prompts", type=int, default=4, help="RL prompts per step")
    parser.add_argument("--k", type=int, default=4, help="RL samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--chunk-mib", type=float, default=256.0, help="openrlaif's logits_chunk_mib (0: off)"
    )
    parser.add_argument("--liger", action="store_true", help="TRL with use_liger_kernel=True")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=["sft", "rl"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error("need --warmup >= 1 and --steps >= warmup + 2")
    if args.side:
        child(args)
        return
    if args.liger and (problem := liger_problem()):
        print(f"TRL with Liger's kernels: not run: {problem}")
        args.liger = False
        if "trl" not in args.runs.split(","):
            return

    from openrlaif.models.precision import cpu_has_native_bf16, cpu_name

    names = {"ours": "openrlaif", "trl": "TRL" + (" + Liger" if args.liger else "")}
    print(
        f"{args.model}, LoRA r {LORA['r']}, float32, {args.threads} threads, {cpu_name()} "
        f"({cpu_has_native_bf16()[1]}); SFT {args.batch_size} x {args.max_length} tokens; RL {args.prompts} "
        f"prompts x K {args.k}, {args.max_new_tokens} new tokens; {args.steps} steps ({args.warmup} warm-up); "
        f"openrlaif logits_chunk_mib {args.chunk_mib or 'off'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args)
        passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("runs", "side", "task", "root", "tasks", "liger") and v is not None]  # fmt: skip
        passed += ["--liger"] if args.liger else []
        for task in args.tasks.split(","):
            results: dict[str, list[dict[str, float]]] = {}
            for side in args.runs.split(","):  # alternating, sharing the machine's noise
                command = [
                    sys.executable,
                    __file__,
                    *passed,
                    f"--side={side}",
                    f"--task={task}",
                    f"--root={root}",
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(
                        f"{side} {task} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
                    )
                result = json.loads(lines[-1][len("RESULT ") :])
                results.setdefault(side, []).append(result)
                print(f"{task:3s} {names[side]:16s} {result['step_s']:7.2f} s/step   peak RSS "
                      f"{result['peak_rss_mib']:7.0f} MiB", flush=True)  # fmt: skip
            if "ours" in results and "trl" in results:
                step = {s: min(r["step_s"] for r in rs) for s, rs in results.items()}
                peak = {s: max(r["peak_rss_mib"] for r in rs) for s, rs in results.items()}
                print(f"{task}: peak RSS openrlaif / {names['trl']} {peak['ours'] / peak['trl']:.2f}x "
                      f"({peak['ours']:.0f} / {peak['trl']:.0f} MiB); step time openrlaif / {names['trl']} "
                      f"{step['ours'] / step['trl']:.2f}x ({step['ours']:.2f} / {step['trl']:.2f} s, best of each)")  # fmt: skip


if __name__ == "__main__":
    main()
