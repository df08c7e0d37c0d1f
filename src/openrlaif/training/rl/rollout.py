"""A rollout: sampling K responses per prompt (in process or through a server that reloads the
policy), laying the samples out for scoring (`Sequences`), and their log-probs under the policy
and the reference, the KL estimate and the KL-shaped rewards (`score_rollout` -> `Rollout`, what
every algorithm's update takes).

Per-token tensors are (N, R) over response tokens only, prompt-major (K samples per prompt), with
a float `mask` (1 = a real token).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openrlaif.inference.local import Sample, sample
from openrlaif.inference.server import RolloutSampler, sample_from_server
from openrlaif.models.kv import accepts_logits_to_keep, cache_argument, output_cache
from openrlaif.models.logprobs import (
    IGNORE_INDEX,
    Logits,
    cat_logits,
    lm_forward,
    token_logprobs,
    token_logprobs_and_entropy,
)
from openrlaif.models.lora import adapters_disabled
from openrlaif.training.accelerator import uses_fsdp
from openrlaif.training.checkpoint import save_model_folder
from openrlaif.training.errors import check_finite
from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.rewards import shaped_rewards

Rows = slice | torch.Tensor  # a micro-batch: a range of rows, or (PPO's shuffled minibatches) row indices
# (log π(y_t), its entropy, V(s_t)) of some rows, with gradients: the training forward
PolicyPass = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


# ---------------------------------------------------------------- sampling


def sample_responses(
    config: RLBaseConfig, accelerator: Any, policy: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
    seed: int, server: RolloutSampler | None,
) -> list[Sample]:  # fmt: skip
    """K samples of each prompt (prompt-major), from the policy in process or from the server
    (which samples from the policy it was last given, see `sync_policy`)."""
    k = config.num_samples
    unwrapped = accelerator.unwrap_model(policy)
    if server is not None:
        return sample_from_server(
            server, unwrapped, tokenizer, [p.prompt for p in prompts], k, seed=seed, keys=[p.id for p in prompts],
            max_new_tokens=config.max_new_tokens, chat_template=config.chat_template,
        )  # fmt: skip
    with accelerator.autocast():
        return sample(
            unwrapped, tokenizer, [p.prompt for p in prompts], n=k, temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, top_p=config.top_p, seed=seed,
            batch_size=config.generation_batch_size, chat_template=config.chat_template,
            keys=[p.id for p in prompts], synced=uses_fsdp(accelerator),
        )  # fmt: skip


def greedy_reference_answers(
    config: RLBaseConfig, accelerator: Any, policy: torch.nn.Module, reference: torch.nn.Module | None,
    tokenizer: Any, prompts: Sequence[Any],
) -> list[str]:  # fmt: skip
    """The reference policy's greedy answer to each prompt (the anchors of `comparisons: anchor`);
    `reference` None: the policy with its LoRA adapters off."""
    model = reference if reference is not None else accelerator.unwrap_model(policy)
    off = adapters_disabled(model) if reference is None else contextlib.nullcontext()
    with off, accelerator.autocast():
        got = sample(
            model, tokenizer, [p.prompt for p in prompts], n=1, temperature=0.0, max_new_tokens=config.max_new_tokens,
            batch_size=config.generation_batch_size, chat_template=config.chat_template, keys=[p.id for p in prompts],
            synced=reference is None and uses_fsdp(accelerator),  # the sharded policy itself
        )  # fmt: skip
    return [s.response_text for s in got]


def sync_policy(
    accelerator: Any, policy: torch.nn.Module, tokenizer: Any, server: Any, sync_dir: Path, step: int
) -> None:
    """Give the rollout server the current policy: saved as `sync_dir/step-N` (written under a
    temporary name, then renamed), reloaded by every server, older folders deleted. Every process
    waits until the servers have it."""
    final, tmp = sync_dir / f"step-{step:08d}", sync_dir / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    # collective; the main process writes. LoRA adapters merged: a server loads plain weights
    save_model_folder(accelerator, policy, tokenizer, tmp, merged=True)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        server.reload_weights(final)
        for old in sync_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def rollout_logp_gap(samples: Sequence[Any], logp: torch.Tensor) -> torch.Tensor:
    """Mean |log π_server(y_t) - log π(y_t)| over the response tokens (the server's log-probs of
    what it sampled, the trainer's of the same tokens): 0 up to float noise when the server
    samples from the trainer's policy; bf16 serving, stale weights between syncs, or a server
    that did not reload show up here. NaN when the server sent no log-probs."""
    gaps = [
        (torch.tensor(s.sampler_logprobs, device=logp.device) - logp[i, : len(s.sampler_logprobs)]).abs()
        for i, s in enumerate(samples)
        if s.sampler_logprobs
    ]
    return torch.cat(gaps).mean() if gaps else torch.tensor(math.nan, device=logp.device)


# ---------------------------------------------------------------- sequences and their log-probs


@dataclass
class Sequences:
    """N sampled sequences laid out for scoring: prompts left-padded, so that every response starts
    at the same column P, and responses right-padded to R tokens. The last response token is only
    a target, never an input, so the inputs are P + R - 1 wide and the logits of the last R
    positions predict the R response tokens: the LM head and the log-softmax never see a prompt
    position (`logits_to_keep`). Per-token tensors of the update are (N, R)."""

    input_ids: torch.Tensor  # (N, P + R - 1)
    attention_mask: torch.Tensor  # (N, P + R - 1)
    position_ids: torch.Tensor  # (N, P + R - 1): 0 at each row's first token, as in generation
    labels: torch.Tensor  # (N, R) the response tokens, IGNORE_INDEX after a response's end
    mask: torch.Tensor  # (N, R) float: 1 at a response token

    def rows(self, rows: Rows) -> Sequences:
        return Sequences(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                         self.labels[rows], self.mask[rows])  # fmt: skip


def build_sequences(samples: Sequence[Any], pad_id: int, device: torch.device) -> Sequences:
    width_p = max(len(s.prompt_ids) for s in samples)
    width_r = max(len(s.response_ids) for s in samples)
    ids, attention, labels = [], [], []
    for s in samples:
        left, right = width_p - len(s.prompt_ids), width_r - len(s.response_ids)
        ids.append([pad_id] * left + list(s.prompt_ids) + list(s.response_ids) + [pad_id] * right)
        attention.append([0] * left + [1] * (len(s.prompt_ids) + len(s.response_ids)) + [0] * right)
        # by position, not by value: pad may equal EOS, and the EOS is an action
        labels.append(list(s.response_ids) + [IGNORE_INDEX] * right)
    input_ids = torch.tensor(ids, device=device)[:, :-1]
    attention_mask = torch.tensor(attention, device=device)[:, :-1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    label_tensor = torch.tensor(labels, device=device)
    return Sequences(
        input_ids, attention_mask, position_ids, label_tensor, (label_tensor != IGNORE_INDEX).float()
    )


def response_logprobs(
    model: torch.nn.Module, seqs: Sequences, with_entropy: bool = False, share_prompts: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) of each response token, (N, R) float32 (0 after a response's end), and with
    `with_entropy` the entropy of π at each of those positions (no gradient; for the log).
    `share_prompts`: rows with the same prompt share its forward pass. With gradients on, autograd
    sums the gradients of a prompt's copies into its one pass, so the gradient is the full pass's
    up to float rounding; not for checkpointed layers (their recomputation would extend the cache
    twice) nor a DDP-wrapped model (two forwards before one backward)."""
    width = seqs.labels.shape[1]
    logits = _shared_prompt_logits(model, seqs) if share_prompts else None
    if logits is None:
        kwargs: dict[str, Any] = {"logits_to_keep": width} if accepts_logits_to_keep(model) else {}
        _, logits = lm_forward(
            model, input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
            use_cache=False, **kwargs,
        )  # fmt: skip
        logits = logits[:, -width:]
    if with_entropy:
        return token_logprobs_and_entropy(logits, seqs.labels)
    return token_logprobs(logits, seqs.labels), None


def _shared_prompt_logits(model: torch.nn.Module, seqs: Sequences) -> Logits | None:
    """The response positions' logits, (N, R, V), with each distinct prompt encoded once (RL's K
    samples of a prompt share it): its KV cache is copied to its rows, which then run their
    response tokens only. The same numbers as one full pass up to float rounding. None when no
    prompt repeats or the model's cache is not a plain `DynamicCache` (then: the full pass)."""
    from transformers import DynamicCache  # why: transformers is slow to import

    width = seqs.labels.shape[1]
    prompt_width = seqs.input_ids.shape[1] - (width - 1)  # inputs: the prompt and R - 1 response tokens
    prompt = torch.cat([seqs.input_ids[:, :prompt_width], seqs.attention_mask[:, :prompt_width]], -1)
    distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True)
    if len(distinct) == len(prompt):
        return None
    ids, mask = distinct[:, :prompt_width], distinct[:, prompt_width:]
    one: dict[str, Any] = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out, logits = lm_forward(model, input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **one)  # fmt: skip
    cache = output_cache(out)
    if type(cache) is not DynamicCache:
        return None
    first = logits[:, -1:][inverse]  # the last prompt position predicts the first response token
    if width == 1:
        return first
    cache.batch_select_indices(inverse)
    _, rest = lm_forward(
        model, input_ids=seqs.input_ids[:, prompt_width:], attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids[:, prompt_width:], use_cache=True, **{cache_argument(model): cache},
    )  # fmt: skip
    return cat_logits([first, rest], 1)


def response_values(value_model: torch.nn.Module, seqs: Sequences) -> torch.Tensor:
    """V of the state before each response token, (N, R) float32. Called through the (possibly
    DDP-wrapped) module, so its gradients are all-reduced."""
    values = value_model(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
        use_cache=False,
    )  # fmt: skip
    return values.float()[:, -seqs.labels.shape[1] :]


@contextlib.contextmanager
def checkpointed_layers(models: Sequence[torch.nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within: each transformer layer of `models` (Hugging Face's `GradientCheckpointingLayer`s)
    keeps only its inputs for the backward, which runs the layer's forward again (non-reentrant
    `torch.utils.checkpoint`: same inputs, same kernels, so the same gradients). The models stay
    in eval mode (no dropout); generation and no-grad passes, outside, keep their KV caches."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint  # why: loaded only when checkpointing
    from transformers.modeling_layers import GradientCheckpointingLayer  # why: slow to import

    layers = [m for model in models for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:  # an instance attribute shadows the class's forward until deleted
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap each transformers `NewGELUActivation` (GPT-2's `gelu_new`) in `model` for `GELUTanh`,
    which computes the same function in one fused kernel; returns how many were swapped. The
    saved model is unchanged (its config still names gelu_new)."""
    from transformers.activations import GELUTanh, NewGELUActivation  # why: slow to import

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def has_checkpointable_layers(model: torch.nn.Module) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer  # why: slow to import

    return any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def prompt_groups(n_prompts: int, k: int, parts: int) -> list[slice]:
    """The rows (prompt-major, k per prompt) of `parts` micro-batches of whole prompts, as even as can be."""
    sizes = [n_prompts // parts + (1 if i < n_prompts % parts else 0) for i in range(parts)]
    bounds = [0, *itertools.accumulate(sizes)]
    return [slice(a * k, b * k) for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------- a scored rollout


@dataclass
class Rollout:
    """One step's samples, scored: what every algorithm's update takes."""

    seqs: Sequences
    scores: torch.Tensor  # (N,) one reward per sample (standardised with `normalize_rewards`)
    rewards: torch.Tensor  # (N, R) KL-shaped: -β·kl_t per token, plus (1-β)·score at the last one
    seq_kl: torch.Tensor  # (N,) each sequence's KL estimate Σ_t kl_t
    ref_logp: torch.Tensor  # (N, R) log π_ref(y_t)
    old_logp: torch.Tensor  # (N, R) log π(y_t) of the policy the samples came from
    old_values: torch.Tensor | None  # (N, R) V(s_t) before the update, with a value model
    micro_batches: list[slice]  # `grad_accum_steps` micro-batches of whole prompts
    num_samples: int  # K, samples per prompt
    # (rows) -> log-probs, entropy and values of those rows with gradients: the training forward
    forward: Callable[[Rows], PolicyPass]
    step: int
    last_checkpoint: Path | None  # named when a non-finite loss stops the run

    @property
    def mask(self) -> torch.Tensor:
        return self.seqs.mask


def score_rollout(
    config: RLBaseConfig, accelerator: Any, policy: torch.nn.Module, reference: torch.nn.Module | None,
    value_model: torch.nn.Module | None, checkpointing: bool, seqs: Sequences, scores: torch.Tensor, step: int,
    last_checkpoint: Path | None,
) -> Rollout:  # fmt: skip
    """Steps 4-5 for one rollout: log-probs under the policy (old) and the reference, values, the
    per-token KL estimate and the KL-shaped reward.

    With one update of the whole rollout (`one_update_per_rollout`, no accumulation) the training
    forward itself gives the old log-probs and values: it runs with the same weights on the same
    inputs (dropout off), so its detached outputs are exactly those of a separate no-grad pass,
    which is skipped; `Rollout.forward` then hands out that pass. Otherwise they come from a
    no-grad pass in `grad_accum_steps` chunks, before any update. `reference` None: the policy
    with its LoRA adapters off."""
    k, mask = config.num_samples, seqs.mask
    micro = prompt_groups(mask.shape[0] // k, k, config.grad_accum_steps)
    fused = config.one_update_per_rollout and len(micro) == 1
    # a sharded policy's forwards are collectives: every process runs the same ones (no shortcut
    # that depends on its rows)
    sharded = uses_fsdp(accelerator)
    with torch.no_grad(), accelerator.autocast():
        ref_model = reference if reference is not None else accelerator.unwrap_model(policy)
        with adapters_disabled(policy) if reference is None else contextlib.nullcontext():
            share_ref = reference is not None or not sharded
            ref_logp = torch.cat(
                [response_logprobs(ref_model, seqs.rows(rows), share_prompts=share_ref)[0] for rows in micro]
            )
        if not fused:
            old_logp = torch.cat(
                [response_logprobs(policy, seqs.rows(rows), share_prompts=not sharded)[0] for rows in micro]
            )
            old_values = (
                torch.cat([response_values(value_model, seqs.rows(rows)) for rows in micro]) * mask
                if value_model is not None else None
            )  # fmt: skip
    # The training forward encodes each prompt once for its K samples where it can (see
    # response_logprobs); PPO's shuffled minibatches run each row in full.
    share = config.one_update_per_rollout and not checkpointing and accelerator.num_processes == 1

    def forward(rows: Rows) -> PolicyPass:
        logp, entropy = response_logprobs(policy, seqs.rows(rows), with_entropy=True, share_prompts=share)
        assert entropy is not None
        return (
            logp,
            entropy,
            response_values(value_model, seqs.rows(rows)) if value_model is not None else None,
        )

    training_pass: Callable[[Rows], PolicyPass] = forward
    if fused:
        trained = [model for model in (policy, value_model) if model is not None]
        with accelerator.autocast(), checkpointed_layers(trained, checkpointing):
            whole = forward(slice(None))
        old_logp = whole[0].detach()
        old_values = whole[2].detach() * mask if whole[2] is not None else None
        training_pass = _replay(whole)

    # 5. per-token KL estimate and the shaped reward (1-β)·r at the end, -β·kl_t per token
    kl = (old_logp - ref_logp) * mask
    seq_kl = kl.sum(-1)
    check_finite(step, "KL", accelerator.reduce(seq_kl.sum(), "sum"), last_checkpoint)
    rewards = shaped_rewards(scores, kl, mask, config.beta)
    return Rollout(seqs, scores, rewards, seq_kl, ref_logp, old_logp, old_values, micro, k, training_pass, step,
                   last_checkpoint)  # fmt: skip


def _replay(whole: PolicyPass) -> Callable[[Rows], PolicyPass]:
    """The training forward already run over the whole rollout, its one micro-batch."""
    return lambda rows: whole
