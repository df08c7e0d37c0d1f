"""DPO training-step throughput: openrlaif's `train_dpo` against TRL's `DPOTrainer`.

Both train the same tiny causal LM (built locally, random weights; GPT-2 architecture by default:
hidden 256, 4 layers, 4 heads, vocab 1024; `--arch llama` for a Llama one of the same size) on
the same hh-harmless pairs with hard labels (p = 1: TRL has no soft labels), sigmoid loss, beta
0.1, the same batch size, max length, learning rate, fused AdamW, gradient clipping, epochs,
threads and precision, with dropout off in the policy (both defaults: TRL's and openrlaif's
`disable_dropout`), no gradient checkpointing (TRL's DPOConfig turns it on by default, which
recomputes the forward activations in the backward pass to save memory, ~1.3x the step time
here; openrlaif has none, so TRL runs with `gradient_checkpointing=False` except in `trl-gc`),
and the reference log-probs precomputed (TRL: `precompute_ref_log_probs=True`). The precompute
time is reported separately (openrlaif: the reference pass alone; TRL: the DPOTrainer
construction, i.e. tokenizing the dataset plus the reference pass).

Each trainer runs `--epochs` epochs over the pairs; the first is a warm-up and the others are
timed whole, from the end of the first epoch's last step to the end of the last step (data
collation, forward, backward, optimizer step; no evaluation, no checkpoints): with
length-grouped batches a few steps are not a fair sample, a whole epoch trains on every pair
once. The incomplete last batch of an epoch is dropped in both (`dataloader_drop_last` for TRL).
Pairs/s are given by wall clock and by process CPU time: on a loaded machine the CPU time (with
`--threads 1`) measures the work done whatever share of the cores the process got.

Runs (`--runs`, names may repeat; runs alternate so they share the machine's noise):
- `ours`: openrlaif with its defaults: batches grouped by length (`group_by_length`), each
  prompt encoded once for both responses (`share_prompt: auto`, packed rows on this model).
- `ours-plain`: `group_by_length: false`, plain shuffled batches as TRL's default sampler.
- `ours-unshared`: `share_prompt: false`, chosen and rejected as separate rows as in TRL.
- `trl`: TRL with its defaults (random sampler), except gradient checkpointing: off.
- `trl-gc`: TRL with its defaults, gradient checkpointing on.
- `trl-grouped`: TRL with transformers' `train_sampling_strategy="group_by_length"` (lengths given
  as a `length` column; megabatches of the same size as openrlaif's), no gradient checkpointing.

Work that differs: length grouping changes which pairs share a batch, not which pairs an epoch
trains on; with `share_prompt` each prompt goes through the model once per pair instead of
twice (the same log-probs and gradients up to float rounding); TRL truncates prompt + response
from the end (`keep_start`) and drops pairs whose prompt fills `max_length` (fewer, shorter pairs
per epoch), openrlaif keeps at least half of `max_length` for the responses and cuts the prompt
from the left; TRL computes extra metrics (entropy, token accuracy).

TRL is a benchmark-only dependency: `pip install -e '.[bench]'` (or `pip install trl`).

    .venv/bin/python benchmarks/bench_dpo_vs_trl.py [--pairs 256] [--batch-size 8] [--max-length 256]
        [--epochs 2] [--threads 2] [--dtype float32|bfloat16] [--arch gpt2|llama]
        [--runs trl,ours,trl,ours]
"""

from __future__ import annotations

import argparse
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
from openrlaif.training import step as step_end_module  # noqa: E402
from openrlaif.training.dpo import DPOConfig  # noqa: E402


def rows(n: int) -> list[dict[str, Any]]:
    pairs = load_pairs("hh-harmless").records[:n]
    # response_a is the reply people chose
    return [{"id": p.id, "prompt": p.prompt, "chosen": p.response_a, "rejected": p.response_b} for p in pairs]


class StepClock:
    """Wall-clock and process CPU time at the end of every training step. Pairs/s over the steps
    after `warmup`: from the end of step `warmup` to the end of the last step. CPU time counts
    the work done, whatever share of a loaded machine the process got (with 1 thread)."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def rates(self, warmup: int, batch_size: int) -> tuple[float, float]:
        """Pairs/s (wall clock, CPU time) from the end of step `warmup` to the end of the last step."""
        timed = self.ends[warmup - 1 :]
        pairs = (len(timed) - 1) * batch_size
        return pairs / (timed[-1][0] - timed[0][0]), pairs / (timed[-1][1] - timed[0][1])


Result = tuple[float, float, float]  # reference precompute seconds, pairs/s by wall clock, by CPU time


def run_ours(model: Path, data: Path, out: Path, args: argparse.Namespace, run: str) -> Result:
    config = DPOConfig(
        model=str(model), data=str(data), output_dir=str(out), epochs=args.epochs, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=5e-5, warmup_ratio=0.0, lr_schedule="constant", beta=0.1,
        eval_fraction=0.0, eval_every=0, save_every=10**9, tensorboard=False, max_grad_norm=1.0,
        mixed_precision="bf16" if args.dtype == "bfloat16" else "no", share_prompt=run != "ours-unshared",
        group_by_length=run != "ours-plain", chat_template="off",  # TRL gets the prompt as plain text too
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

    clock = StepClock()
    kill_hook = step_end_module.simulate_kill  # called once per step, right after the optimizer step

    def step_end(step: int) -> None:
        clock.tick()
        kill_hook(step)

    dpo.compute_reference_logprobs, step_end_module.simulate_kill = timed, step_end
    try:
        dpo.train_dpo(config, show_progress=False)
    finally:
        dpo.compute_reference_logprobs, step_end_module.simulate_kill = original, kill_hook
    per_epoch = args.pairs // args.batch_size  # steps; the warm-up is the first epoch
    return precompute, *clock.rates(per_epoch, args.batch_size)


def run_trl(
    model_path: Path, data: list[dict[str, Any]], out: Path, args: argparse.Namespace, run: str
) -> Result:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # the completion follows the prompt after a space, as openrlaif's encoding puts it
    rows = [
        {"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in data
    ]
    extra: dict[str, Any] = {}
    if (
        run == "trl-grouped"
    ):  # transformers' LengthGroupedSampler reads a `length` column: tokens of the longer sequence
        for r in rows:
            prompt = len(tokenizer(r["prompt"])["input_ids"])
            completion = max(
                len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected")
            )
            r["length"] = min(args.max_length, prompt + completion + 1)  # + EOS
        # the column must survive until the sampler is built
        extra = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False}
    dataset = Dataset.from_list(rows)
    config = TRLDPOConfig(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=5e-5, warmup_steps=0, lr_scheduler_type="constant", beta=0.1,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
        save_strategy="no", eval_strategy="no", logging_steps=10_000, report_to="none", use_cpu=True,
        bf16=args.dtype == "bfloat16", max_grad_norm=1.0, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, weight_decay=0.0, dataloader_drop_last=True,
        gradient_checkpointing=run == "trl-gc", **extra,
    )  # fmt: skip

    clock = StepClock()

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    precompute = time.perf_counter() - started
    trainer.add_callback(StepTimes())
    per_epoch = len(trainer.get_train_dataloader())  # steps (TRL drops pairs whose prompt fills max_length)
    trainer.train()
    return precompute, *clock.rates(per_epoch, args.batch_size)


NAMES = {
    "ours": "openrlaif",
    "ours-plain": "openrlaif group_by_length=false",
    "ours-unshared": "openrlaif share_prompt=false",
    "trl": "TRL DPOTrainer",
    "trl-gc": "TRL gradient checkpointing",
    "trl-grouped": "TRL group_by_length",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="the first one is a warm-up, not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument(
        "--runs", default="trl,ours,trl,ours", help=f"comma-separated, of: {', '.join(NAMES)}"
    )
    args = parser.parse_args()
    runs = args.runs.split(",")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one is not timed)")
    if unknown := sorted(set(runs) - set(NAMES)):
        parser.error(f"unknown runs: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
        model = build_tiny_causal_lm(
            root / "model", arch=args.arch, hidden_size=256, num_layers=4, num_heads=4
        )
        data = rows(args.pairs)
        data_file = root / "pairs.jsonl"
        write_records(data_file, data)
        print(
            f"{args.arch}: {len(data)} hh-harmless pairs, batch {args.batch_size}, max_length {args.max_length}, "
            f"{args.epochs} epochs (the first not timed), {args.threads} threads, {args.dtype}"
        )
        results: dict[str, list[Result]] = {}
        for i, run in enumerate(runs):
            out = root / f"{run}{i}"
            if run.startswith("trl"):
                result = run_trl(model, data, out, args, run)
            else:
                result = run_ours(model, data_file, out, args, run)
            results.setdefault(run, []).append(result)
            print(
                f"{NAMES[run]:32s} reference precompute {result[0]:6.2f} s   training {result[1]:7.2f} pairs/s "
                f"(by CPU time {result[2]:7.2f} pairs/s)"
            )
        for clock, column in (("wall clock", 1), ("CPU time", 2)):
            best = {run: max(r[column] for r in rs) for run, rs in results.items()}
            print(
                f"best of each, {clock}: " + ", ".join(f"{NAMES[r]} {v:.2f} pairs/s" for r, v in best.items())
            )
            for ours in (r for r in best if r.startswith("ours")):
                for trl in (r for r in best if r.startswith("trl")):
                    print(f"  ratio {NAMES[ours]} / {NAMES[trl]}: {best[ours] / best[trl]:.2f}x")


if __name__ == "__main__":
    main()
