"""Direct preference optimisation (DPO) on soft AI labels, top to bottom (DESIGN §2.5).

Given a prompt x, a chosen response y_c, a rejected one y_r and the AI labeler's probability p
that y_c is better, the policy π is trained against a frozen reference π_ref with

    Δ = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))
    L = -[p · log σ(βΔ) + (1 - p) · log σ(-βΔ)]

computed with `logsigmoid`. p = 1 is the standard sigmoid DPO loss (Rafailov et al. 2023); a
soft p is the cross-entropy between the labeler's preference and the policy's implicit one. β
(`beta`, default 0.1 as in the DPO paper and TRL) sets how far π may move from π_ref; the AI-label
experiments of Sharma et al. (arXiv 2402.12366) use β = 0.05. Log-probs are summed over the
response tokens (and the appended EOS) only: prompt and padding are masked.

The implicit rewards β·(log π(y|x) - log π_ref(y|x)) of chosen and rejected, their margin and the
accuracy (the margin agrees with the label's preferred side) are logged for training and the
held-out split, with the mean log-ratio log π - log π_ref over the held-out responses (a
Monte-Carlo-free estimate of how far the policy moved from the reference on the data).

The reference log-probs are computed once, before training, by the reference model (the initial
policy, or `ref_model`), stored in `output_dir/ref_logprobs.safetensors` with a hash of the data,
and the reference model is freed: training runs one policy forward per batch (chosen and
rejected concatenated), and a resumed run reads the file instead of recomputing.

Data: the output of `openrlaif label` (`p_chosen`), any `prompt`/`chosen`/`rejected` file (p = 1),
pairs with a human label, or the built-in `hh-harmless`: the reward trainer's loader
(`openrlaif.training.reward.load_preference_examples`).

    openrlaif train dpo --config configs/train/dpo-tiny.yaml [--resume]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from openrlaif.training.common import (
    IGNORE_INDEX,
    ExampleIdLog,
    MetricsLogger,
    ShardedBatches,
    Throughput,
    TrainConfig,
    TrainResult,
    check_finite,
    encode_prompt_completions,
    eval_shard,
    format_metrics,
    load_checkpoint,
    load_pretrained,
    load_tokenizer,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    pad_right,
    plan_steps,
    prepare_run,
    quiet_transformers,
    resolve_model_path,
    save_checkpoint,
    save_model_folder,
    set_seed,
    simulate_kill,
    split_held_out,
    token_logprobs,
)
from openrlaif.training.reward import PreferenceExample, agreement, load_preference_examples

REF_FILE = "ref_logprobs.safetensors"


class DPOConfig(TrainConfig):
    """DPO settings (the shared ones are documented on TrainConfig)."""

    beta: float = Field(0.1, gt=0.0)  # 0.1: DPO paper / TRL default; Sharma et al. use 0.05
    ref_model: str | None = None  # the frozen reference; default: the initial policy (`model`)
    learning_rate: float = Field(1e-6, gt=0.0)
    append_eos: bool = True  # responses end with EOS, as the policy generates them
    # Encode each prompt once for both responses (its KV cache, with gradients, is shared by the
    # chosen and the rejected continuation): the same log-probs up to float rounding, (P + 2R)
    # instead of 2(P + R) tokens. Not always faster (the cached continuation loses the plain
    # causal attention kernel; 0.6x on the CPU benchmark); for long prompts with short responses.
    # Off: chosen and rejected as two full sequences in one concatenated forward pass. The
    # reference pass uses the same path.
    share_prompt: bool = False


# ---------------------------------------------------------------- data


@dataclass
class DPOBatch:
    input_ids: torch.Tensor  # (2B, T): the B chosen sequences, then the B rejected ones
    attention_mask: torch.Tensor
    labels: torch.Tensor  # input_ids with IGNORE_INDEX on prompt tokens and padding
    p: torch.Tensor  # (B,) P(chosen is better)
    human: torch.Tensor  # (B,) NaN where unknown
    ref: torch.Tensor  # (B, 2) reference log-probs of chosen, rejected
    n_tokens: int
    first_label: int  # the first position with a label: logits before it are not needed
    # share_prompt: prompts (B, P) left-padded; responses (2B, R) right-padded, chosen i at row 2i,
    # rejected i at row 2i+1 (input_ids/attention_mask/labels above are then the responses)
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> DPOBatch:
        return DPOBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
            self.p.to(device), self.human.to(device), self.ref.to(device), self.n_tokens, self.first_label,
            None if self.prompt_ids is None else self.prompt_ids.to(device),
            None if self.prompt_mask is None else self.prompt_mask.to(device),
        )  # fmt: skip


def collate(
    examples: list[PreferenceExample],
    ref: torch.Tensor,
    tokenizer: Any,
    max_length: int,
    append_eos: bool = True,
    share_prompt: bool = False,
) -> DPOBatch:
    prompts = [x.prompt for x in examples]
    responses = [x.chosen for x in examples] + [x.rejected for x in examples]
    encoded = encode_prompt_completions(tokenizer, prompts + prompts, responses, max_length, append_eos)
    if share_prompt:
        return _collate_shared(examples, encoded, ref)
    input_ids = pad_right([ids for ids, _ in encoded], tokenizer.pad_token_id)
    attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0)
    labels = input_ids.clone()
    for row, (ids, n_prompt) in enumerate(encoded):
        # by position, not by token id: pad may equal eos, and the appended eos is part of the response
        labels[row, :n_prompt] = IGNORE_INDEX
        labels[row, len(ids) :] = IGNORE_INDEX
    p = torch.tensor([x.p for x in examples], dtype=torch.float32)
    human = torch.tensor([math.nan if x.human is None else x.human for x in examples], dtype=torch.float32)
    first_label = min(n_prompt for _, n_prompt in encoded)
    return DPOBatch(input_ids, attention_mask, labels, p, human, ref, int(attention_mask.sum()), first_label)


def _collate_shared(
    examples: list[PreferenceExample], encoded: list[tuple[list[int], int]], ref: torch.Tensor
) -> DPOBatch:
    b = len(examples)
    prompts, responses = [], []
    for i in range(b):
        (chosen, n_c), (rejected, n_r) = encoded[i], encoded[b + i]
        # one prompt for both: the one cut shorter (for the longer response) keeps both within max_length
        n = min(n_c, n_r)
        prompts.append(chosen[:n] if n_c == n else rejected[:n])
        responses += [chosen[n_c:], rejected[n_r:]]
    width = max(len(x) for x in prompts)
    prompt_ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts], dtype=torch.long)
    prompt_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], dtype=torch.long)
    response_ids = pad_right(responses, 0)
    response_mask = pad_right([[1] * len(x) for x in responses], 0)
    labels = response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    p = torch.tensor([x.p for x in examples], dtype=torch.float32)
    human = torch.tensor([math.nan if x.human is None else x.human for x in examples], dtype=torch.float32)
    n_tokens = int(prompt_mask.sum() + response_mask.sum())
    return DPOBatch(response_ids, response_mask, labels, p, human, ref, n_tokens, 0, prompt_ids, prompt_mask)


# ---------------------------------------------------------------- log-probs


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def response_logprobs(model: torch.nn.Module, batch: DPOBatch) -> torch.Tensor:
    """Summed log-probs of each sequence's response tokens, float32 (2B,).

    The LM head and the log-softmax run only from the first response position on
    (`logits_to_keep`, where the model takes it): prompt logits would be computed and thrown away.
    """
    if batch.prompt_ids is not None:
        return _shared_prompt_logprobs(model, batch)
    width = batch.input_ids.shape[1]
    keep = width - max(batch.first_label - 1, 0)  # logits at t predict token t+1
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs
    ).logits
    logits = logits[:, -keep:]  # without logits_to_keep: the same slice of the full logits
    targets = batch.labels[:, width - keep + 1 :]
    return token_logprobs(logits[:, :-1], targets).sum(-1)


def _shared_prompt_logprobs(model: torch.nn.Module, batch: DPOBatch) -> torch.Tensor:
    """`response_logprobs` with each prompt encoded once: the prompt's KV cache (gradients flow
    through it) is repeated for its two responses, which continue it in one forward pass."""
    assert batch.prompt_ids is not None and batch.prompt_mask is not None
    prompt_mask = batch.prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=batch.prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, **kwargs
    )  # fmt: skip
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # row i -> rows 2i (chosen), 2i+1 (rejected)
    last = out.logits[:, -1:].repeat_interleave(2, dim=0)  # predicts each response's first token
    lengths = prompt_mask.sum(-1).repeat_interleave(2)
    width = batch.input_ids.shape[1]
    response_positions = lengths[:, None] + torch.arange(width, device=lengths.device)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(2, dim=0), batch.attention_mask], dim=-1),
        position_ids=response_positions,
        past_key_values=cache,
        use_cache=True,
    ).logits
    logp = token_logprobs(torch.cat([last, logits[:, :-1]], dim=1), batch.labels).sum(-1)
    return torch.cat([logp[0::2], logp[1::2]])  # chosen first, then rejected, as the other path


@torch.no_grad()
def compute_reference_logprobs(
    model: torch.nn.Module,
    examples: list[PreferenceExample],
    tokenizer: Any,
    config: DPOConfig,
    accelerator: Any,
) -> torch.Tensor:
    """(N, 2) log π_ref(chosen), log π_ref(rejected) of every example, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = []
    batch_size = config.eval_batch_size or config.batch_size
    dummy = torch.zeros(0, 2)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(
            chunk, dummy, tokenizer, config.max_length, config.append_eos, config.share_prompt
        ).to(accelerator.device)
        with accelerator.autocast():  # the same precision as the policy's forward in training
            logp = response_logprobs(model, batch)
        out.append(torch.stack(logp.chunk(2), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def data_hash(
    train_set: list[PreferenceExample], held_out: list[PreferenceExample], config: DPOConfig, mixed: str
) -> str:
    """What the reference log-probs depend on: the examples in order, the reference, the encoding."""
    digest = hashlib.sha256()
    settings = [
        config.ref_model or config.model,
        config.revision,
        config.max_length,
        config.append_eos,
        mixed,
    ]
    digest.update(json.dumps(settings).encode())
    for part in (train_set, held_out):
        digest.update(json.dumps([[x.id, x.prompt, x.chosen, x.rejected] for x in part]).encode())
        digest.update(b"|")
    return digest.hexdigest()


def read_reference_file(path: Path, expected_hash: str) -> dict[str, torch.Tensor] | None:
    """The stored reference log-probs ("train", "held_out"), or None when missing or for other data."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("data_hash") != expected_hash:
            return None
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def write_reference_file(path: Path, tensors: dict[str, torch.Tensor], data_hash_: str, ref: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"data_hash": data_hash_, "ref_model": ref}
    )  # fmt: skip
    os.replace(tmp, path)  # atomic: a run killed while writing leaves no torn file


# ---------------------------------------------------------------- loss and metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    p: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair soft-label DPO loss and the implicit rewards β·(log π - log π_ref) of chosen and rejected."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected  # = βΔ
    loss = -(p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin))
    return loss, reward_chosen, reward_rejected


N_SUMS = 8


def dpo_sums(
    loss: torch.Tensor,
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    p: torch.Tensor,
    human: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Sums that add up across batches and processes: loss, pairs, label agreement and count,
    human agreement and count, implicit reward of chosen, of rejected."""
    margin = reward_chosen - reward_rejected
    ai, ai_n = agreement(margin, p)
    hu, hu_n = agreement(margin, human)
    parts = [loss, torch.ones_like(p), ai, ai_n, hu, hu_n, reward_chosen, reward_rejected]
    return torch.stack([(x.double() * weight).sum() for x in parts])


def metrics_from_sums(sums: torch.Tensor, prefix: str, beta: float) -> dict[str, float]:
    loss, n, ai, ai_n, hu, hu_n, chosen, rejected = sums.tolist()
    n = max(n, 1.0)
    metrics = {
        f"{prefix}/loss": loss / n,
        f"{prefix}/accuracy": ai / ai_n if ai_n else math.nan,
        f"{prefix}/rewards/chosen": chosen / n,
        f"{prefix}/rewards/rejected": rejected / n,
        f"{prefix}/rewards/margin": (chosen - rejected) / n,
        # mean over the responses (chosen and rejected) of log π - log π_ref
        f"{prefix}/logratio": (chosen + rejected) / (2 * n * beta),
    }
    if hu_n:
        metrics[f"{prefix}/human_accuracy"] = hu / hu_n
    return metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[PreferenceExample],
    ref: torch.Tensor,
    tokenizer: Any,
    config: DPOConfig,
    accelerator: Any,
) -> dict[str, float]:
    """Held-out loss, implicit rewards, accuracy and log-ratio, summed over all processes."""
    model.eval()
    shard = eval_shard(len(examples), accelerator.process_index, accelerator.num_processes)
    sums = torch.zeros(N_SUMS, dtype=torch.float64, device=accelerator.device)
    batch_size = config.eval_batch_size or config.batch_size
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        indices = [i for i, _ in chunk]
        batch = collate(
            [examples[i] for i in indices],
            ref[indices],
            tokenizer,
            config.max_length,
            config.append_eos,
            config.share_prompt,
        ).to(accelerator.device)
        policy_chosen, policy_rejected = response_logprobs(model, batch).chunk(2)
        loss, r_c, r_r = dpo_loss(
            policy_chosen, policy_rejected, batch.ref[:, 0], batch.ref[:, 1], batch.p, config.beta
        )
        weight = torch.tensor([c for _, c in chunk], dtype=torch.float64, device=accelerator.device)
        sums += dpo_sums(loss, r_c, r_r, batch.p, batch.human, weight)
    model.train()
    return metrics_from_sums(accelerator.reduce(sums, "sum"), "eval", config.beta)


# ---------------------------------------------------------------- training


def train_dpo(config: DPOConfig, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    accelerator = make_accelerator(config)
    output_dir, checkpoint = prepare_run(config, resume, accelerator)
    set_seed(config.seed)

    # Data. The held-out split depends only on the seed, so a resumed run gets the same one.
    examples = load_preference_examples(config.data, config.limit)
    eval_examples = load_preference_examples(config.eval_data) if config.eval_data else None
    train_set, held_out = split_held_out(examples, config, eval_examples)

    # Policy: from the checkpoint when resuming (the folder holds the tokenizer too).
    with accelerator.main_process_first():  # a `tiny:` model is built once
        source = str(checkpoint.model_dir) if checkpoint else resolve_model_path(config.model)
        ref_source = resolve_model_path(config.ref_model or config.model)
    tokenizer = load_tokenizer(source, config.revision, config.trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, source, config.revision, config.trust_remote_code)

    # Reference log-probs, once per dataset: the main process computes and writes them, the others
    # (and a resumed run) read the file. The reference model is dropped before training starts.
    ref_file = output_dir / REF_FILE
    expected = data_hash(train_set, held_out, config, accelerator.mixed_precision)
    ref_seconds = 0.0
    with accelerator.main_process_first():
        stored = read_reference_file(ref_file, expected)
        if stored is None:
            if not accelerator.is_main_process:
                raise RuntimeError(f"{ref_file}: not written by the main process")  # cannot happen
            started = time.perf_counter()
            if checkpoint is None and config.ref_model is None:
                ref_model = model  # the initial policy itself: no second copy
            else:
                ref_model = load_pretrained(
                    AutoModelForCausalLM, ref_source, config.revision, config.trust_remote_code
                )
            ref_model.to(accelerator.device)
            stored = {
                "train": compute_reference_logprobs(ref_model, train_set, tokenizer, config, accelerator),
                "held_out": compute_reference_logprobs(ref_model, held_out, tokenizer, config, accelerator),
            }
            del ref_model  # frees the reference when it was a separate model
            write_reference_file(ref_file, stored, expected, config.ref_model or config.model)
            ref_seconds = time.perf_counter() - started
    ref_train, ref_held_out = stored["train"], stored["held_out"]

    loader = ShardedBatches(
        len(train_set), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )
    total_steps = plan_steps(config, loader, len(train_set), accelerator.num_processes)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader) if checkpoint else 0

    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, "DPO", show_progress)
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    logger.print(
        f"DPO (beta {config.beta}): {len(train_set)} training / {len(held_out)} held-out pairs; "
        f"{total_steps} steps of {global_batch} pairs ({config.batch_size} x {config.grad_accum_steps} accumulation x "
        f"{accelerator.num_processes} process(es)); {accelerator.device}, mixed precision {accelerator.mixed_precision}"
        + (f"; reference log-probs computed in {ref_seconds:.1f} s -> {ref_file}" if ref_seconds else
           f"; reference log-probs read from {ref_file}")
        + (f"; resuming after step {start_step} from {checkpoint.path}" if checkpoint else "")
    )  # fmt: skip
    first_metrics = final_metrics = None
    if start_step == 0 and held_out:
        first_metrics = evaluate(model, held_out, ref_held_out, tokenizer, config, accelerator)
        logger.log(0, first_metrics)
        logger.print(f"step 0 (before training): {format_metrics(first_metrics)}")

    last_checkpoint = checkpoint.path if checkpoint else None
    throughput = Throughput()
    model.train()
    try:
        for step in range(start_step + 1, total_steps + 1):
            sums = torch.zeros(N_SUMS, dtype=torch.float64, device=accelerator.device)
            samples, tokens, ids = 0, 0, []
            for _ in range(config.grad_accum_steps):
                indices = loader.next_batch()
                chunk = [train_set[i] for i in indices]
                batch = collate(
                    chunk,
                    ref_train[indices],
                    tokenizer,
                    config.max_length,
                    config.append_eos,
                    config.share_prompt,
                )
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                    # chosen and rejected in one forward pass
                    policy_chosen, policy_rejected = response_logprobs(model, batch).chunk(2)
                    loss, r_c, r_r = dpo_loss(
                        policy_chosen, policy_rejected, batch.ref[:, 0], batch.ref[:, 1], batch.p, config.beta
                    )
                    accelerator.backward(loss.mean())  # divides by grad_accum_steps
                ones = torch.ones_like(batch.p, dtype=torch.float64)
                sums += dpo_sums(loss.detach(), r_c.detach(), r_r.detach(), batch.p, batch.human, ones)
                samples, tokens = samples + len(chunk), tokens + batch.n_tokens
                ids.extend(x.id for x in chunk)

            # One all-reduce for the log: metric sums, samples and tokens over all processes.
            totals = accelerator.reduce(torch.cat([sums, sums.new_tensor([samples, tokens])]), "sum")
            train_metrics = metrics_from_sums(totals[:N_SUMS], "train", config.beta)
            check_finite(step, "loss", train_metrics["train/loss"], last_checkpoint)  # before the optimizer
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            check_finite(step, "gradient norm", grad_norm, last_checkpoint)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ids_log.write(step, ids)

            metrics = {k: v for k, v in train_metrics.items() if not math.isnan(v)}
            metrics["train/learning_rate"] = learning_rate
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            rates = throughput.rates(totals[N_SUMS].item(), totals[N_SUMS + 1].item())
            metrics |= {f"train/{k}": v for k, v in rates.items()}
            if step % config.log_every == 0 or step == total_steps:
                logger.log(step, metrics)
            logger.advance(step, f"loss {train_metrics['train/loss']:.4f}")
            simulate_kill(step)

            if held_out and (step == total_steps or (config.eval_every and step % config.eval_every == 0)):
                final_metrics = evaluate(model, held_out, ref_held_out, tokenizer, config, accelerator)
                check_finite(step, "held-out loss", final_metrics["eval/loss"], last_checkpoint)
                logger.log(step, {k: v for k, v in final_metrics.items() if not math.isnan(v)})
                logger.print(f"step {step}: {format_metrics(final_metrics)}")
            if step % config.save_every == 0 or step == total_steps:
                last_checkpoint = save_checkpoint(
                    accelerator, output_dir, step, model, tokenizer, optimizer, scheduler, loader, config.keep_checkpoints
                )  # fmt: skip
            throughput.started = time.perf_counter()  # eval and saving are not training time
    finally:
        logger.close()

    if final_metrics is None and held_out:  # resumed a finished run
        final_metrics = evaluate(model, held_out, ref_held_out, tokenizer, config, accelerator)
    model_dir = output_dir / "model"
    save_model_folder(accelerator, model, tokenizer, model_dir)
    accelerator.wait_for_everyone()
    logger.print(f"DPO done: {total_steps} steps; model -> {model_dir}")
    return TrainResult(
        output_dir=output_dir, model_dir=model_dir, steps=total_steps, metrics=final_metrics or {},
        first_metrics=first_metrics, model=accelerator.unwrap_model(model),
    )  # fmt: skip
