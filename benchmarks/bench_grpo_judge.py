"""GRPO with a pairwise judge inside the loop: judgments per second and RL step time for
`comparisons: anchor` against `all_pairs` (and `round_robin`, rounds 1) at K = 4 and 8, and against TRL's GRPOTrainer given the
same judge as its reward function.

The policy is a tiny GPT-2 architecture model (built locally, random weights; hidden 256, 4
layers, 4 heads, vocab 1024); the judge is openrlaif's `hf` judge (the paper's prompt, soft labels
from the "1"/"2" log-probs, both orders) running a second such model, so every judgment costs a
real forward pass. Each prompt's anchor is a fixed response (the same file for every run), so the
anchors cost nothing inside the timed steps on either side.

- openrlaif: `train_rl` with `algorithm: grpo`, `reward: {type: judge_pairwise, comparisons:
  anchor | all_pairs, anchor: FILE}`: a step's ordered judgments (2K per prompt with anchor,
  K(K-1) with all pairs) go to the judge in one call, batched with the template's shared prefix
  encoded once.
- TRL: `GRPOTrainer` with a reward function that asks the same judge, per completion, for P(it beats
  its prompt's anchor) in both orders (`judge.compare_many`, one call per reward-function call: the
  batching TRL's reward-function interface allows), i.e. the same rewards as openrlaif's anchor
  mode. TRL has no pairwise/group judge reward of its own.

Judgments per second: the judge's ordered judgments divided by the time spent inside the judge
(measured by a wrapper around `judge_orders`). Step time: from the end of one step to the end of
the next, after `--warmup` steps. Each run in its own subprocess, runs alternating; 2 threads.

TRL is a benchmark-only dependency: `pip install -e '.[bench]'`.

    .venv/bin/python benchmarks/bench_grpo_judge.py [--steps 6] [--warmup 2] [--batch-size 4]
        [--max-new-tokens 24] [--judge-model packaged:gemma-3-270m] [--runs anchor4,all4,rr4,trl4,anchor8,all8,rr8,trl8]
"""

from __future__ import annotations

import argparse
import json
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

TEMPERATURE = 0.9
BETA = 0.05
LEARNING_RATE = 1e-6


class JudgeClock:
    """Time spent in a judge's `judge_orders` and the ordered judgments it made (it wraps the
    instance's method: `compare_many` and the cache go through it as usual)."""

    def __init__(self, judge: Any) -> None:
        self.seconds, self.judgments = 0.0, 0
        real = judge.judge_orders

        def judge_orders(items: Sequence[Any]) -> list[Any]:
            start = time.perf_counter()
            out = real(items)
            self.seconds += time.perf_counter() - start
            self.judgments += len(items)
            return out

        judge.judge_orders = judge_orders


def make_judge(root: Path) -> tuple[Any, JudgeClock]:
    from openrlaif.config import HFJudgeConfig
    from openrlaif.judges.hf import HFJudge

    model = os.environ.get("BENCH_JUDGE_MODEL") or str(root / "judge")
    judge = HFJudge(HFJudgeConfig(model=model, batch_size=32, dtype="float32"))
    return judge, JudgeClock(judge)


def run_ours(root: Path, out: Path, args: argparse.Namespace, mode: str, k: int) -> dict[str, float]:
    from openrlaif.training.rl import RLConfig, train_rl

    judge, clock = make_judge(root)
    reward = {
        "type": "judge_pairwise",
        "judge": "timed",
        "comparisons": mode,
        "anchor": str(root / "anchors.jsonl"),
    }
    config = RLConfig(
        model=str(root / "policy"), data=str(root / "prompts.jsonl"), output_dir=str(out), algorithm="grpo",
        reward=reward, max_steps=args.steps, batch_size=args.batch_size, num_samples=k,
        max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, beta=BETA,
        generation_batch_size=args.batch_size * k, learning_rate=LEARNING_RATE, lr_schedule="constant",
        warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, mixed_precision="no", tensorboard=False,
        save_every=args.steps, log_every=1, chat_template="off", seed=0, gradient_checkpointing=False,
        judge_diagnostics_every=0, canary_every=0,
    )  # fmt: skip
    train_rl(config, show_progress=False, judge=judge)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/samples_per_s" in m and m["step"] > args.warmup]
    n = args.batch_size * k
    seconds = sum(n / m["train/samples_per_s"] for m in steps) / len(steps)
    return {"step_s": seconds, "judgments_per_s": clock.judgments / clock.seconds,
            "judgments_per_step": clock.judgments / args.steps}  # fmt: skip


def run_trl(root: Path, out: Path, args: argparse.Namespace, k: int) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    judge, clock = make_judge(root)
    anchors = {
        r["prompt"]: r["response"] for r in map(json.loads, (root / "anchors.jsonl").read_text().splitlines())
    }
    tokenizer = AutoTokenizer.from_pretrained(root / "policy")
    model = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.float32)
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])

    def anchor_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        got = judge.compare_many(
            [(p, c.strip(), anchors[p]) for p, c in zip(prompts, completions, strict=True)]
        )
        return [c.p_a for c in got]

    n = args.batch_size * k
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=n, num_generations=k,
        steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new_tokens, temperature=TEMPERATURE,
        top_p=1.0, beta=BETA, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", eval_strategy="no", logging_steps=10_000,
        report_to="none", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, log_completions=False, gradient_checkpointing=False,
    )  # fmt: skip
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=anchor_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    trainer.add_callback(StepTimes())
    trainer.train()
    timed = ends[args.warmup - 1 :]
    return {"step_s": (timed[-1] - timed[0]) / (len(timed) - 1), "judgments_per_s": clock.judgments / clock.seconds,
            "judgments_per_step": clock.judgments / args.steps}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    out = root / f"{args.side}-{time.time_ns()}"
    kind, k = args.side.rstrip("0123456789"), int(args.side[len(args.side.rstrip("0123456789")) :])
    if kind == "trl":
        result = run_trl(root, out, args, k)
    else:
        result = run_ours(
            root, out, args, {"anchor": "anchor", "all": "all_pairs", "rr": "round_robin"}[kind], k
        )
    print("RESULT " + json.dumps(result), flush=True)


def prepare(root: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from openrlaif.data.datasets import load_pairs
    from openrlaif.data.io import write_records
    from openrlaif.models.tiny import build_tiny_causal_lm

    policy = build_tiny_causal_lm(root / "policy", arch="gpt2", hidden_size=256, num_layers=4, num_heads=4)
    build_tiny_causal_lm(root / "judge", arch="gpt2", hidden_size=256, num_layers=4, num_heads=4, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompts, anchors = [], []
    for p in load_pairs("hh-harmless").records[: args.prompts]:
        ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"][-args.prompt_tokens :]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        prompts.append({"id": p.id, "prompt": text})
        anchors.append({"id": f"anchor-{p.id}", "prompt": text, "response": p.response_a})  # people's reply
    write_records(root / "prompts.jsonl", prompts)
    write_records(root / "anchors.jsonl", anchors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--judge-model", default=None,
                        help="the judge's model (default: a tiny random GPT-2; e.g. packaged:gemma-3-270m)")  # fmt: skip
    parser.add_argument("--runs", default="anchor4,all4,rr4,trl4,anchor8,all8,rr8,trl8",
                        help="comma-separated: anchorK, allK, rrK (openrlaif; rr: round robin, rounds 1), "
                             "trlK (TRL GRPOTrainer)")  # fmt: skip
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error("need --warmup >= 1 and --steps >= warmup + 2")
    if args.side:
        child(args)
        return
    if args.judge_model:
        os.environ["BENCH_JUDGE_MODEL"] = args.judge_model  # the children read it
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args)
        print(f"GRPO, {args.batch_size} prompts per step (last {args.prompt_tokens} tokens), {args.max_new_tokens} new "
              f"tokens, {args.steps} steps ({args.warmup} warm-up not timed), {args.threads} threads, float32; judge: "
              f"hf judge on {args.judge_model or 'a tiny GPT-2'}, both orders")  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        passed = [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("runs", "side", "root")
        ]
        for run in args.runs.split(","):
            done = subprocess.run([sys.executable, __file__, *passed, f"--side={run}", f"--root={root}"],
                                  capture_output=True, text=True)  # fmt: skip
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{run} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
            results[run] = json.loads(lines[-1][len("RESULT ") :])
            r = results[run]
            print(f"{run:9s} step {r['step_s']:6.2f} s   {r['judgments_per_step']:6.0f} judgments/step   "
                  f"judge {r['judgments_per_s']:7.1f} judgments/s", flush=True)  # fmt: skip
        for k in sorted({int(r[len(r.rstrip("0123456789")) :]) for r in results}):
            a, b, t = (results.get(f"{name}{k}") for name in ("anchor", "all", "trl"))
            rr = results.get(f"rr{k}")
            if a and rr:
                print(f"K={k}: round_robin / anchor step time {rr['step_s'] / a['step_s']:.2f}x")
            if a and b:
                print(f"K={k}: all_pairs / anchor step time {b['step_s'] / a['step_s']:.2f}x")
            if a and t:
                print(f"K={k}: TRL GRPOTrainer / openrlaif anchor step time {t['step_s'] / a['step_s']:.2f}x")


if __name__ == "__main__":
    main()
