"""RL step throughput (RLOO): openrlaif's `train_rl` against TRL's `RLOOTrainer`.

Both train the same tiny GPT-2 architecture model (built locally, random weights; hidden 256,
4 layers, 4 heads, vocab 1024) on the same hh-harmless prompts (each cut to its last
`--prompt-tokens` tokens, decoded, and the same text given to both), with the same K samples per
prompt, max new tokens, temperature 0.9, top_p 1, prompts per step, steps, learning rate
(constant), AdamW without weight decay, gradient clipping 1.0, β 0.05, fp32, 2 threads, and the
same reward: a deterministic Python function of the response text (tanh of a quarter of the number
of times " the" occurs), given to TRL as a reward function and to openrlaif as a `Judge`'s `score_responses`
(reward type `judge_score`). Each side runs in its own subprocess (started from the same saved
model); its peak memory is that process's RSS high-water mark (VmHWM, model load included).

Throughput is completions per second over the steps after `--warmup` steps, from the end of one
step to the end of the next (K samples per prompt generated, rewarded, the policy and reference
log-probs, one backward, one optimizer step). Model building, loading and warm-up steps are not
timed; no evaluation, no checkpoints inside the timed steps (openrlaif saves only after the last
step: `save_every` = steps), no logging backends (TRL `report_to="none"`, openrlaif
`tensorboard=False`; openrlaif still writes one metrics.jsonl row per step, which is where its
rates are read from).

Both run with gradient checkpointing in the training forward (TRL's `RLOOConfig` default and
openrlaif's RL default; `--gradient-checkpointing off` turns it off for both): each transformer
layer keeps only its input, and runs again in the backward. Both compute log-probs (and the LM
head) at the response positions only (TRL: its fused chunked LM head; openrlaif:
`logits_to_keep` over left-padded prompts), and both compute the token entropy in the training
forward. Both use the first-order per-token KL estimate log π - log π_ref summed over the
response as a sequence-level reward penalty. Neither uses a value model.

Differences in work that remain:
- GELU: openrlaif computes GPT-2's `gelu_new` with PyTorch's fused tanh-GELU kernel (its
  `fused_activations` setting, on by default: the same function, float rounding apart, in one
  kernel that keeps one tensor for the backward instead of eight element-wise operations that
  keep theirs); TRL runs transformers' `gelu_new` as written. `--fused-gelu off` makes openrlaif
  run `gelu_new` too.
- Forwards per step: TRL runs three passes of the policy-sized model (old-policy log-probs and
  reference log-probs, both without gradient, then the training forward); openrlaif runs two
  (reference, training forward): with one update per rollout its training forward has the same
  weights and inputs as an old-policy pass, so it takes the old log-probs from it (detached).
- Generation: each side uses its own generation code (openrlaif `inference.local.sample`, TRL
  `model.generate`, both Hugging Face `generate` with a dynamic KV cache). openrlaif encodes each
  prompt once for its K samples and copies the prompt's KV cache to them; TRL encodes all
  prompts x K rows. Response lengths follow from the random policy and differ slightly.
- Loss: openrlaif's RLOO loss is -A_i · Σ_t log π(y_i,t) (REINFORCE with the leave-one-out
  baseline); TRL's is the clipped importance-ratio objective on sequence log-probs (ratio 1 with
  `num_iterations` 1), and it divides its logits by the temperature for its log-probs (no
  difference in work), and gathers more metrics (clip ratios, completion length statistics).
  openrlaif's return is (1-β)·r - β·KL, TRL's r - β·KL (a scale on r, no difference in work).

TRL is a benchmark-only dependency: `pip install -e '.[bench]'` (or `pip install trl`).

    .venv/bin/python benchmarks/bench_rl_vs_trl.py [--prompts 64] [--prompt-tokens 128] [--k 4]
        [--batch-size 8] [--max-new-tokens 32] [--steps 10] [--warmup 2] [--threads 2]
        [--gradient-checkpointing on|off] [--fused-gelu on|off] [--runs trl,ours,trl,ours]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

KEYWORD = " the"
TEMPERATURE = 0.9
BETA = 0.05
LEARNING_RATE = 1e-6


def reward_of(text: str) -> float:
    """The shared reward: a cheap deterministic function of the response text, in [0, 1) (a
    judge's score must lie in [-1, 1])."""
    return math.tanh(text.count(KEYWORD) / 4)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_ours(model: Path, prompts: Path, out: Path, args: argparse.Namespace) -> float:
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
        model=str(model), data=str(prompts), output_dir=str(out), algorithm="rloo",
        reward={"type": "judge_score", "judge": "count"}, max_steps=args.steps, batch_size=args.batch_size,
        num_samples=args.k, max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, beta=BETA,
        generation_batch_size=args.batch_size * args.k, learning_rate=LEARNING_RATE, lr_schedule="constant",
        warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, mixed_precision="no", tensorboard=False,
        save_every=args.steps, log_every=1, chat_template="off", seed=0,
        gradient_checkpointing=args.gradient_checkpointing == "on", fused_activations=args.fused_gelu == "on",
    )  # fmt: skip
    train_rl(config, show_progress=False, judge=CountJudge())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # per-step rates measured by the trainer: from the end of one step to the end of the next
    steps = [m for m in metrics if "train/samples_per_s" in m and m["step"] > args.warmup]
    n = args.batch_size * args.k
    return len(steps) * n / sum(n / m["train/samples_per_s"] for m in steps)


def run_trl(model_path: Path, prompts: Path, out: Path, args: argparse.Namespace) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])

    def count_reward(completions: list[str], **kwargs: Any) -> list[float]:
        # openrlaif scores the stripped decoded text; TRL passes the decoded completion
        return [reward_of(c.strip()) for c in completions]

    n = args.batch_size * args.k  # TRL's batch size counts completions, not prompts
    config = RLOOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=n, num_generations=args.k,
        steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE, top_p=1.0, beta=BETA, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", eval_strategy="no",
        logging_steps=10_000, report_to="none", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, log_completions=False, gradient_checkpointing=args.gradient_checkpointing == "on",
    )  # fmt: skip

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    trainer = RLOOTrainer(
        model=model, reward_funcs=count_reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(StepTimes())
    trainer.train()
    timed = ends[args.warmup - 1 :]  # the end of step `warmup` to the end of the last step
    return (len(timed) - 1) * n / (timed[-1] - timed[0])


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    out = root / f"{args.side}-{time.time_ns()}"
    run = run_trl if args.side == "trl" else run_ours
    rate = run(root / "model", root / "prompts.jsonl", out, args)
    print("RESULT " + json.dumps({"rate": rate, "peak_rss_mib": peak_rss_mib()}), flush=True)


def prepare(root: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from openrlaif.data.datasets import load_pairs
    from openrlaif.data.io import write_records
    from openrlaif.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(root / "model", arch="gpt2", hidden_size=256, num_layers=4, num_heads=4)
    tokenizer = AutoTokenizer.from_pretrained(model)
    records = []
    for p in load_pairs("hh-harmless").records[: args.prompts]:
        ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"][-args.prompt_tokens :]
        records.append({"id": p.id, "prompt": tokenizer.decode(ids, skip_special_tokens=True).strip()})
    write_records(root / "prompts.jsonl", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="for both (on: TRL's RLOOConfig default and openrlaif's)")  # fmt: skip
    parser.add_argument("--fused-gelu", choices=["on", "off"], default="on",
                        help="openrlaif's fused_activations (off: both run transformers' gelu_new)")  # fmt: skip
    parser.add_argument("--runs", default="trl,ours,trl,ours", help="comma-separated: ours, trl (may repeat)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one child run
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error("need --warmup >= 1 and --steps >= warmup + 2")
    if args.side:
        child(args)
        return

    names = {"ours": "openrlaif train_rl", "trl": "TRL RLOOTrainer"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args)
        print(
            f"{args.prompts} hh-harmless prompts (last {args.prompt_tokens} tokens), {args.batch_size} prompts x "
            f"K {args.k} per step, {args.max_new_tokens} new tokens, temperature {TEMPERATURE}, {args.steps} steps "
            f"({args.warmup} warm-up not timed), {args.threads} threads, float32, gradient checkpointing "
            f"{args.gradient_checkpointing}, openrlaif fused GELU {args.fused_gelu}"
        )
        results: dict[str, list[dict[str, float]]] = {}
        passed = [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("runs", "side", "root")
        ]
        for run in args.runs.split(","):  # a name may repeat: runs alternate, sharing the machine's noise
            command = [sys.executable, __file__, *passed, f"--side={run}", f"--root={root}"]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{run} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            results.setdefault(run, []).append(result)
            print(
                f"{names[run]:20s} {result['rate']:7.2f} completions/s   peak RSS {result['peak_rss_mib']:7.0f} MiB",
                flush=True,
            )
        best = {run: max(r["rate"] for r in rs) for run, rs in results.items()}
        peak = {run: max(r["peak_rss_mib"] for r in rs) for run, rs in results.items()}
        print("best of each: " + ", ".join(f"{names[r]} {v:.2f} completions/s" for r, v in best.items()))
        if "ours" in best and "trl" in best:
            print(f"ratio openrlaif / TRL (best of each): {best['ours'] / best['trl']:.2f}x")
            print(f"peak RSS openrlaif / TRL (max of each): {peak['ours']:.0f} / {peak['trl']:.0f} MiB")


if __name__ == "__main__":
    main()
