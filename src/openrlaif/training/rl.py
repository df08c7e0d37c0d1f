"""RL from AI feedback, top to bottom (DESIGN §2.3-2.4): REINFORCE with a learned baseline, RLOO,
PPO and online DPO.

The objective (the paper's, β = 0.05 by default):

    J(θ) = E[(1 - β) · r(x, y) - β · KL(π_θ(·|x) ‖ π_ref(·|x))]

where π_ref is the frozen SFT model the policy starts from. Every step:

1. take `batch_size` prompts per process (sharded across processes like the other trainers);
2. sample `num_samples` (K) responses per prompt from the current policy (`generation.sample`,
   temperature 0.9, a new seed each step), in process or through an OpenAI-compatible server
   (`rollout_server`: vLLM, SGLang) that reloads the policy from disk every `sync_every` steps;
3. reward each response, from `reward.type`:
   - `reward_model`: a model trained with `openrlaif train rm` (it re-tokenizes the decoded text,
     so it may use another tokenizer than the policy);
   - `judge_score` (d-RLAIF, §2.4): the judge's direct score in [-1, 1], no reward model;
   - `judge_pairwise`: each sample's win rate in [0, 1] against the other K-1 samples of its
     prompt (the judge's P(win), both orders averaged, via `judge.compare_many`);
4. log-probs of the sampled response tokens under the policy and the reference; the per-token
   KL estimate is kl_t = log π(y_t) - log π_ref(y_t) (its sum over the response is an unbiased
   estimate of the sequence KL; a single batch's mean can be slightly negative);
5. shape the reward per token: r_t = -β · kl_t at every response token, plus (1 - β) · r at the
   final one (γ = 1: the return of the whole response is (1 - β)·r - β·KL, the objective);
6. one update, by `algorithm`:
   - `reinforce` (the paper's): returns G_t = Σ_{s≥t} r_s, advantage A_t = G_t - V(s_t) from a
     learned value model, policy loss -mean_t(A_t · log π(y_t)), value loss ½·mean_t(V - G)².
     The value model is a separate copy of the SFT model's transformer body with a scalar head on
     every position (`TokenValueModel`, initialised from SFT as in the paper; not shared with the
     policy, so the value loss cannot disturb the policy's representation);
   - `rloo`: the sequence return R_i = (1 - β)·r_i - β·KL_i, baseline = the mean of R over the
     other K-1 samples of the same prompt, loss -mean_i((R_i - b_i) · Σ_t log π(y_i,t)); no value
     model;
   - `ppo`: GAE(γ, λ) advantages from the value model, `ppo_epochs` passes over the rollout in
     `num_minibatches` minibatches, each an optimizer step on the clipped surrogate
     max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) (ρ = π/π_old per token) plus the clipped value loss;
   - `online_dpo`: of each prompt's K fresh samples, the one with the highest reward is chosen
     and the lowest rejected (with `judge_pairwise`, the judge's win rates pick them); the sigmoid
     DPO loss -log σ(β_dpo·Δ) against the reference (`dpo_beta` takes the KL penalty's place;
     prompts whose samples all tie are skipped).

One optimizer (AdamW) holds the policy's and the value model's parameters (the value model's
learning rate is `value_learning_rate`), with one schedule stepped once per RL step; dropout is
off (the update's log-probs are those the samples were drawn from); `normalize_rewards`
standardises each step's rewards over the batch before the KL penalty (β then weighs KL against
a unit-scale reward), `whiten_advantages` normalises the advantages over the batch's tokens. `grad_accum_steps` splits each update into
micro-batches (of whole prompts; PPO: of each minibatch) whose losses are their shares of the
batch's, so the gradient is the same with less activation memory; `gradient_checkpointing`
(on by default) keeps only each transformer layer's input in the training forward, and
`fused_activations` computes GPT-2's tanh-GELU in one kernel. With one
update per rollout and no accumulation, the training forward also gives the old log-probs (the
same weights and inputs: a separate no-grad pass would compute the same numbers). Log-probs
are computed at the response positions only, and each prompt is encoded once for its K samples
in the reference and old-policy passes, and in the training pass too when its layers are not
checkpointed and one process trains (the gradient is the same; tested). A non-finite reward, KL or loss stops the run with
one line naming the step and the quantity; the last good checkpoint stays. Checkpoints hold
the policy, the value model (`value/`), the optimizer, scheduler, RNG states and the prompt
position; `--resume` continues exactly (with server rollouts, as exactly as the server samples).

DeepSpeed/FSDP are untested for RL (two trained models, one optimizer).

    openrlaif train rl --config configs/train/rl-tiny.yaml [--resume]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from openrlaif.generation import load_prompts
from openrlaif.inference.local import sample
from openrlaif.inference.server import RolloutSampler, RolloutServerConfig, sample_from_server
from openrlaif.training.common import (
    IGNORE_INDEX,
    ExampleIdLog,
    MetricsLogger,
    ShardedBatches,
    Throughput,
    TrainConfig,
    TrainingError,
    TrainResult,
    check_finite,
    load_checkpoint,
    load_pretrained,
    load_tokenizer,
    make_accelerator,
    make_scheduler,
    one_writer_per_output_dir,
    plan_steps,
    prepare_run,
    quiet_transformers,
    resolve_model_path,
    save_checkpoint,
    save_model_folder,
    set_seed,
    simulate_kill,
    token_logprobs,
)
from openrlaif.training.reward import ValueHeadModel

Algorithm = Literal["reinforce", "rloo", "ppo", "online_dpo"]
RewardFn = Callable[[list[str], list[str], list[list[int]]], list[float]]  # prompts, texts, ids -> r


class RewardSource(BaseModel):
    """Where rewards come from: a trained reward model, or a judge (d-RLAIF score or pairwise)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reward_model", "judge_score", "judge_pairwise"]
    path: str | None = None  # reward_model: the folder `openrlaif train rm` wrote
    judge: str | None = None  # judge_*: a shipped judge name or a judge YAML file
    batch_size: int = Field(16, ge=1)  # reward-model scoring batch

    @model_validator(mode="after")
    def _check(self) -> RewardSource:
        if self.type == "reward_model" and not self.path:
            raise ValueError("reward type reward_model needs `path` (a folder from `openrlaif train rm`)")
        if self.type != "reward_model" and not self.judge:
            raise ValueError(f"reward type {self.type} needs `judge` (a judge name or YAML file)")
        return self


class RLConfig(TrainConfig):
    """RL settings (the shared ones are documented on TrainConfig). `model` is the SFT policy,
    which is also the frozen reference and the value model's starting point; `data` holds the
    prompts; `batch_size` is prompts per process per step, each sampled `num_samples` times."""

    data: str = "hh-harmless"
    reward: RewardSource
    algorithm: Algorithm = "reinforce"
    ref_model: str | None = None  # the KL reference; default: `model`
    beta: float = Field(0.05, ge=0.0, le=1.0)  # J = (1-β)·r - β·KL
    num_samples: int = Field(4, ge=1)  # K responses per prompt
    temperature: float = Field(0.9, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    chat_template: Literal["auto", "on", "off"] = "auto"
    generation_batch_size: int = Field(32, ge=1)
    # Sample through an OpenAI-compatible server (vLLM, SGLang) instead of in process; the
    # trainer saves the policy for it to reload every `rollout_server.sync_every` steps
    rollout_server: RolloutServerConfig | None = None
    learning_rate: float = Field(1e-6, gt=0.0)
    value_learning_rate: float | None = Field(None, gt=0.0)  # default: learning_rate
    value_loss_coef: float = Field(0.5, ge=0.0)
    whiten_advantages: bool = False  # normalise advantages to mean 0, std 1 over the batch
    # Standardise each step's rewards (mean 0, std 1 over the batch of every process) before the
    # KL penalty: β then weighs KL against a reward of unit scale. A weakly confident judge or a
    # reward model trained on its soft labels gives rewards that differ by a few hundredths,
    # which β·KL would outweigh from the first steps. The logged reward stays the raw one.
    normalize_rewards: bool = False
    # PPO
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0)
    dpo_beta: float = Field(0.1, gt=0.0)  # online DPO: the β of the DPO loss (it replaces the KL penalty)
    value_clip_range: float | None = Field(0.2, gt=0.0)  # None: no value clipping
    ppo_epochs: int = Field(2, ge=1)
    num_minibatches: int = Field(2, ge=1)
    # Keep only each transformer layer's input in the training forward and run the layer again in
    # the backward: activation memory of one layer instead of all, for one more forward of compute
    # (RL's memory peak is that forward over batch_size x num_samples sequences). TRL's default too.
    gradient_checkpointing: bool = True
    # Compute GPT-2's `gelu_new` (eight element-wise operations, each output kept for the backward)
    # with PyTorch's fused tanh-GELU: the same function in one kernel (transformers'
    # gelu_pytorch_tanh; float rounding apart), less activation memory and time. Other models: no-op.
    fused_activations: bool = True
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # RL holds no prompts out
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.algorithm in ("rloo", "online_dpo") and self.num_samples < 2:
            raise ValueError(
                f"algorithm {self.algorithm} needs num_samples >= 2 (each sample is compared with the others)"
            )
        if self.reward.type == "judge_pairwise" and self.num_samples < 2:
            raise ValueError("reward type judge_pairwise needs num_samples >= 2 (samples are compared)")
        # Accumulation splits each step's rollout: every micro-batch needs rows (whole prompts outside PPO)
        if self.algorithm == "ppo":
            rows = (
                self.batch_size
                * self.num_samples
                // min(self.num_minibatches, self.batch_size * self.num_samples)
            )
            if rows < self.grad_accum_steps:
                raise ValueError(
                    f"grad_accum_steps {self.grad_accum_steps} splits each PPO minibatch into micro-batches, but a "
                    f"minibatch has only {rows} sequences (batch_size x num_samples / num_minibatches)"
                )
        elif self.grad_accum_steps > self.batch_size:
            raise ValueError(
                f"grad_accum_steps {self.grad_accum_steps} splits each step's {self.batch_size} prompts into "
                "micro-batches of whole prompts: it must be at most batch_size"
            )
        return self

    @property
    def uses_value_model(self) -> bool:
        return self.algorithm in ("reinforce", "ppo")


# ---------------------------------------------------------------- advantages, baselines, losses
# Per-token tensors are (N, T) over response tokens only, with a float `mask` (1 = a real token).


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -β·kl_t at every response token, plus (1-β)·score at the last one (reward only on
    the final token; the KL penalty folded in per token)."""
    rewards = -beta * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1)  # the last response token (responses start after the prompt)
    rewards[torch.arange(len(scores)), last] += (1.0 - beta) * scores
    return rewards


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s-t} r_s within each response (0 at padding)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """R_i minus the mean R of the other k-1 samples of its prompt (samples prompt-major)."""
    grouped = returns.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def best_worst_pairs(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO's pair per prompt: (chosen = the highest reward, rejected = the lowest, valid =
    the two differ); indices into the prompt-major samples."""
    grouped = scores.view(-1, k)
    offset = torch.arange(grouped.shape[0], device=scores.device) * k
    chosen, rejected = grouped.argmax(-1) + offset, grouped.argmin(-1) + offset
    return chosen, rejected, (grouped.max(-1).values > grouped.min(-1).values).float()


def dpo_loss(
    policy_logp: torch.Tensor, ref_logp: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
    valid: torch.Tensor, beta: float, denominator: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """-mean log σ(β·Δ), Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)), over
    the valid pairs (sequence log-probs (N,)). `denominator`: the whole batch's number of valid
    pairs, when these pairs are one micro-batch of it (the micro-batches' losses then sum to the
    batch's)."""
    margin = policy_logp - ref_logp
    delta = margin[chosen] - margin[rejected]
    count = valid.sum().clamp(min=1) if denominator is None else denominator
    return -(torch.nn.functional.logsigmoid(beta * delta) * valid).sum() / count


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: δ_t = r_t + γ·V_{t+1} - V_t (V = 0 after the last token),
    A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        next_value = torch.where(m > 0, values[:, t], next_value)  # padding carries nothing back
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Clipped surrogate mean_t max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, denominator)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask, denominator)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: float | None, denominator: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """½·mean_t (V - G)², with PPO's clipping of V to old_V ± clip (the worse of the two errors)."""
    error = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask, denominator)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked tokens; with `denominator` (the whole batch's token count) the share of
    a micro-batch, so that the micro-batches' shares sum to the batch's mean."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)


def standardized(scores: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """(r - mean) / std over the rewards of every process's batch (`normalize_rewards`)."""
    stats = accelerator.reduce(torch.stack([scores.sum(), (scores**2).sum(), torch.tensor(float(len(scores)),
                               device=scores.device)]).double(), "sum")  # fmt: skip
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean**2).clamp(min=0.0)
    return ((scores - mean) * torch.rsqrt(var + 1e-8)).float()


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# ---------------------------------------------------------------- rewards


def pairwise_win_rates(judge: Any, prompts: Sequence[str], texts: Sequence[str], k: int) -> list[float]:
    """Each sample's mean P(win) against the other k-1 samples of its prompt (prompt-major)."""
    pairs, index = [], []
    for g in range(len(texts) // k):
        for i in range(k):
            for j in range(i + 1, k):
                pairs.append((prompts[g * k], texts[g * k + i], texts[g * k + j]))
                index.append((g * k + i, g * k + j))
    wins = [0.0] * len(texts)
    for (a, b), c in zip(index, judge.compare_many(pairs), strict=True):
        wins[a] += c.p_a
        wins[b] += 1.0 - c.p_a
    return [w / (k - 1) for w in wins]


def make_reward_fn(config: RLConfig, tokenizer: Any, device: torch.device, judge: Any = None) -> RewardFn:
    """(prompts, response texts, response ids) -> one reward per response. `judge`, when given,
    replaces the configured one (programmatic use and tests)."""
    source = config.reward
    if source.type == "reward_model":
        from openrlaif.training.reward import RewardModel

        # scoring batches padded as the trainers pad theirs
        rm = RewardModel.from_pretrained(
            source.path or "", device=device, pad_multiple=config.pad_to_multiple_of
        )
        return lambda prompts, texts, ids: rm.score_generations(
            prompts, ids, tokenizer, source.batch_size
        ).tolist()
    if judge is None:
        from openrlaif.judges import build_judge, load_judge_config

        judge = build_judge(load_judge_config(source.judge or ""))
    if source.type == "judge_score":
        return lambda prompts, texts, ids: [
            s.score for s in judge.score_many(list(zip(prompts, texts, strict=True)))
        ]
    return lambda prompts, texts, ids: pairwise_win_rates(judge, prompts, texts, config.num_samples)


# ---------------------------------------------------------------- sequences and their log-probs

Rows = slice | torch.Tensor  # a micro-batch: a range of rows, or (PPO's shuffled minibatches) row indices


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


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


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
        kwargs: dict[str, Any] = {"logits_to_keep": width} if _accepts_logits_to_keep(model) else {}
        logits = model(
            input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
            use_cache=False, **kwargs,
        ).logits[:, -width:]  # fmt: skip
    logits = logits.float()
    logp = token_logprobs(logits, seqs.labels)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, entropy


def _shared_prompt_logits(model: torch.nn.Module, seqs: Sequences) -> torch.Tensor | None:
    """The response positions' logits, (N, R, V), with each distinct prompt encoded once (RL's K
    samples of a prompt share it): its KV cache is copied to its rows, which then run their
    response tokens only. The same numbers as one full pass up to float rounding. None when no
    prompt repeats or the model's cache is not a plain `DynamicCache` (then: the full pass)."""
    from transformers import DynamicCache

    width = seqs.labels.shape[1]
    prompt_width = seqs.input_ids.shape[1] - (width - 1)  # inputs: the prompt and R - 1 response tokens
    prompt = torch.cat([seqs.input_ids[:, :prompt_width], seqs.attention_mask[:, :prompt_width]], -1)
    distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True)
    if len(distinct) == len(prompt):
        return None
    ids, mask = distinct[:, :prompt_width], distinct[:, prompt_width:]
    one: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, **one)  # fmt: skip
    cache = out.past_key_values
    if type(cache) is not DynamicCache:
        return None
    first = out.logits[:, -1:][inverse]  # the last prompt position predicts the first response token
    if width == 1:
        return first
    cache.batch_select_indices(inverse)
    rest = model(
        input_ids=seqs.input_ids[:, prompt_width:], attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids[:, prompt_width:], past_key_values=cache, use_cache=True,
    ).logits  # fmt: skip
    return torch.cat([first, rest], 1)


class TokenValueModel(ValueHeadModel):
    """The reward module's `ValueHeadModel` (same folder format), with a value at every position
    rather than at the last token only: V(s_t) for each state of the response."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


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
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

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
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def has_checkpointable_layers(model: torch.nn.Module) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def prompt_groups(n_prompts: int, k: int, parts: int) -> list[slice]:
    """The rows (prompt-major, k per prompt) of `parts` micro-batches of whole prompts, as even as can be."""
    sizes = [n_prompts // parts + (1 if i < n_prompts % parts else 0) for i in range(parts)]
    bounds = [0, *itertools.accumulate(sizes)]
    return [slice(a * k, b * k) for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------- training


def make_rl_optimizer(
    policy: torch.nn.Module, value_model: torch.nn.Module | None, config: RLConfig
) -> torch.optim.Optimizer:
    """AdamW over the policy and the value model (fused, one kernel per update, where the device
    has it: as `make_optimizer` and transformers' default); weight decay on matrices only."""
    groups = []
    for model, lr in (
        (policy, config.learning_rate),
        (value_model, config.value_learning_rate or config.learning_rate),
    ):
        if model is None:
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
        ]
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused
    )


@dataclass
class Updater:
    """What an optimizer step needs, for `step`."""

    accelerator: Any
    optimizer: torch.optim.Optimizer
    models: list[torch.nn.Module]  # the trained (possibly DDP-wrapped) models
    max_grad_norm: float | None
    checkpointing: bool  # the training forwards under `checkpointed_layers`

    def step(
        self, micro_batches: Sequence[Rows], loss_of: Callable[[Rows], dict[str, torch.Tensor]], step: int,
        last_checkpoint: Path | None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """One optimizer step over `micro_batches`. `loss_of(rows)` returns a micro-batch's share of
        the batch's "loss" and of each logged statistic (sums over its rows divided by the whole
        batch's counts), so the accumulated gradient is the batch's whatever the split. Gradients
        are all-reduced (DDP) once, on the last micro-batch; then the loss and the gradient norm
        must be finite, the norm is clipped and the optimizer steps. Returns the summed shares and
        the gradient norm."""
        accelerator = self.accelerator
        totals: dict[str, torch.Tensor] = {}
        for i, rows in enumerate(micro_batches):
            with contextlib.ExitStack() as stack:
                if i < len(micro_batches) - 1:  # accumulate locally; the last backward all-reduces
                    for model in self.models:
                        stack.enter_context(accelerator.no_sync(model))
                with accelerator.autocast(), checkpointed_layers(self.models, self.checkpointing):
                    shares = loss_of(rows)
                # accelerate divides by gradient_accumulation_steps (= grad_accum_steps); the shares
                # already sum to the batch's loss
                accelerator.backward(shares["loss"] * accelerator.gradient_accumulation_steps)
            for name, value in shares.items():
                totals[name] = totals[name] + value.detach() if name in totals else value.detach()
        check_finite(step, "loss", accelerator.reduce(totals["loss"], "mean"), last_checkpoint)
        parameters = [p for model in self.models for p in model.parameters()]
        grad_norm = accelerator.clip_grad_norm_(parameters, self.max_grad_norm or math.inf)
        check_finite(step, "gradient norm", grad_norm, last_checkpoint)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals | {"grad_norm": torch.as_tensor(float(grad_norm))}


@one_writer_per_output_dir
def train_rl(
    config: RLConfig, resume: bool = False, show_progress: bool = True, *, judge: Any = None
) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly.
    `judge` replaces the configured judge (a `Judge` object, e.g. for tests)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    accelerator = make_accelerator(config)
    output_dir, checkpoint = prepare_run(config, resume, accelerator)
    set_seed(config.seed)
    device = accelerator.device

    prompts = load_prompts(config.data, limit=config.limit).records
    if not prompts:
        raise TrainingError(f"{config.data}: no prompts")

    # Models: policy (trained), reference (frozen SFT), value model (a copy of the SFT body + head).
    with accelerator.main_process_first():  # a `tiny:` model is built once
        sft_path = resolve_model_path(config.model)
        ref_path = resolve_model_path(config.ref_model) if config.ref_model else sft_path
    source = str(checkpoint.model_dir) if checkpoint else sft_path
    tokenizer = load_tokenizer(source, config.revision, config.trust_remote_code)
    policy = load_pretrained(AutoModelForCausalLM, source, config.revision, config.trust_remote_code)
    reference = load_pretrained(AutoModelForCausalLM, ref_path, config.revision, config.trust_remote_code)
    reference.to(device).eval().requires_grad_(False)
    value_model = None
    if config.uses_value_model:
        value_source = str(checkpoint.path / "value") if checkpoint else sft_path
        value_model = TokenValueModel.from_pretrained(value_source, config.revision, config.trust_remote_code)
    if config.fused_activations:
        for model in (policy, reference, value_model):
            if model is not None:
                fuse_activations(model)
    reward_fn = make_reward_fn(config, tokenizer, device, judge)
    server, sync_dir = None, output_dir / "rollout_policy"  # RL samples in process unless a server is set
    if config.rollout_server is not None:
        server = RolloutSampler(
            config.rollout_server, config.temperature, config.top_p, config.max_new_tokens
        )
        sync_dir = Path(config.rollout_server.sync_dir or sync_dir)

    loader = ShardedBatches(
        len(prompts), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )
    # one batch of prompts per step (accumulation splits a step's rollout, it takes no more prompts)
    total_steps = plan_steps(config.model_copy(update={"grad_accum_steps": 1}), loader, len(prompts),
                             accelerator.num_processes)  # fmt: skip
    optimizer = make_rl_optimizer(policy, value_model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    if value_model is not None:
        policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    start_step = load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader) if checkpoint else 0
    trained = [policy] + ([value_model] if value_model is not None else [])
    for m in trained:  # dropout off: the update's log-probs must be those the samples were drawn from
        m.eval()
    checkpointing = config.gradient_checkpointing and all(has_checkpointable_layers(m) for m in trained)
    updater = Updater(accelerator, optimizer, trained, config.max_grad_norm, checkpointing)

    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, f"RL ({config.algorithm})",
                           show_progress)  # fmt: skip
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    k = config.num_samples
    logger.print(
        f"RL ({config.algorithm}, reward {config.reward.type}): {len(prompts)} prompts; {total_steps} steps of "
        f"{config.batch_size * accelerator.num_processes} prompts x {k} samples; β {config.beta}, temperature "
        f"{config.temperature}; {device}, mixed precision {accelerator.mixed_precision}"
        + (f"; {config.grad_accum_steps} micro-batches per update" if config.grad_accum_steps > 1 else "")
        + (f"; resuming after step {start_step} from {checkpoint.path}" if checkpoint else "")
    )
    if config.gradient_checkpointing and not checkpointing:
        logger.print(
            "note: gradient_checkpointing is on, but the model has no Hugging Face checkpointable layers"
        )
    last_checkpoint = checkpoint.path if checkpoint else None
    throughput = Throughput()
    try:
        for step in range(start_step + 1, total_steps + 1):
            # 1-2. prompts and K samples each (a fresh seed per step; per-sample seeds as in `generate`)
            chunk = [prompts[i] for i in loader.next_batch()]
            unwrapped = accelerator.unwrap_model(policy)
            seed = config.seed * 1_000_003 + step
            if server is not None:  # the server samples from the policy it was last given
                assert config.rollout_server is not None
                if step == start_step + 1 or (step - 1) % config.rollout_server.sync_every == 0:
                    sync_policy(accelerator, policy, tokenizer, server, sync_dir, step - 1)
                samples = sample_from_server(
                    server, unwrapped, tokenizer, [p.prompt for p in chunk], k, seed=seed, keys=[p.id for p in chunk],
                    max_new_tokens=config.max_new_tokens, chat_template=config.chat_template,
                )  # fmt: skip
            else:
                with accelerator.autocast():
                    samples = sample(
                        unwrapped, tokenizer, [p.prompt for p in chunk], n=k, temperature=config.temperature,
                        max_new_tokens=config.max_new_tokens, top_p=config.top_p, seed=seed,
                        batch_size=config.generation_batch_size, chat_template=config.chat_template,
                        keys=[p.id for p in chunk],
                    )  # fmt: skip
            prompt_texts = [p.prompt for p in chunk for _ in range(k)]

            # 3. rewards
            scores = torch.tensor(
                reward_fn(prompt_texts, [s.response_text for s in samples], [s.response_ids for s in samples]),
                dtype=torch.float32, device=device,
            )  # fmt: skip
            # summed over processes, so every process stops together
            check_finite(step, "reward", accelerator.reduce(scores.sum(), "sum"), last_checkpoint)

            # 4-6. log-probs, the KL-shaped reward, advantages and the update
            seqs = build_sequences(samples, tokenizer.pad_token_id, device)
            learning_rate = scheduler.get_last_lr()[0]
            shaped = standardized(scores, accelerator) if config.normalize_rewards else scores
            losses, seq_kl, old_logp = rl_update(config, updater, policy, reference, value_model, seqs, shaped, step,
                                                 last_checkpoint)  # fmt: skip
            if (
                server is not None
            ):  # how far the server's log-probs are from the trainer's (0: the same weights)
                losses["rollout_logp_gap"] = rollout_logp_gap(samples, old_logp)
            scheduler.step()
            ids_log.write(step, [f"{p.id}-{i}" for p in chunk for i in range(k)])

            # Log: means over all processes; samples and tokens summed.
            lengths = seqs.mask.sum(-1)
            tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
            local = torch.stack([
                scores.mean(), scores.std(unbiased=False), seq_kl.mean(), lengths.mean(),
                *[v.to(device).float() for v in losses.values()],
                torch.tensor(float(len(samples)), device=device), torch.tensor(float(tokens), device=device),
            ]).double()  # fmt: skip
            total = accelerator.reduce(local, "sum")
            n = accelerator.num_processes
            names = ["reward_mean", "reward_std", "kl", "response_length", *losses]
            metrics = {f"train/{name}": total[i].item() / n for i, name in enumerate(names)}
            metrics["train/objective"] = (1 - config.beta) * metrics[
                "train/reward_mean"
            ] - config.beta * metrics["train/kl"]
            metrics["train/learning_rate"] = learning_rate
            metrics |= {
                f"train/{k_}": v for k_, v in throughput.rates(total[-2].item(), total[-1].item()).items()
            }
            if step % config.log_every == 0 or step == total_steps:
                logger.log(step, metrics)
            logger.advance(step, f"reward {metrics['train/reward_mean']:.3f} kl {metrics['train/kl']:.3f}")
            simulate_kill(step)

            if step % config.save_every == 0 or step == total_steps:
                extra = {"value": value_model} if value_model is not None else None
                last_checkpoint = save_checkpoint(
                    accelerator, output_dir, step, policy, tokenizer, optimizer, scheduler, loader,
                    config.keep_checkpoints, extra_models=extra,
                )  # fmt: skip
            throughput.started = time.perf_counter()  # saving is not training time
    finally:
        logger.close()

    model_dir = output_dir / "model"
    save_model_folder(accelerator, policy, tokenizer, model_dir)
    if value_model is not None:
        save_model_folder(accelerator, value_model, tokenizer, output_dir / "value")
    accelerator.wait_for_everyone()
    logger.print(f"RL done: {total_steps} steps; policy -> {model_dir}")
    # RL holds no prompts out: no held-out metrics (the per-step training ones are in metrics.jsonl)
    return TrainResult(
        output_dir=output_dir, model_dir=model_dir, steps=total_steps, metrics={}, first_metrics=None,
        model=accelerator.unwrap_model(policy),
    )  # fmt: skip


def rl_update(
    config: RLConfig, updater: Updater, policy: torch.nn.Module, reference: torch.nn.Module,
    value_model: torch.nn.Module | None, seqs: Sequences, scores: torch.Tensor, step: int,
    last_checkpoint: Path | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Steps 4-6 for one rollout: log-probs under the policy (old) and the reference, values, the
    KL-shaped reward, advantages and the update. Returns the logged losses, each sequence's KL
    and the old log-probs.

    With one update of the whole rollout (not PPO, no accumulation) the training forward itself
    gives the old log-probs and values: it runs with the same weights on the same inputs (dropout
    off), so its detached outputs are exactly those of a separate no-grad pass, which is skipped.
    Otherwise they come from a no-grad pass in `grad_accum_steps` chunks, before any update."""
    accelerator, k, mask = updater.accelerator, config.num_samples, seqs.mask
    n = mask.shape[0]
    micro = prompt_groups(n // k, k, config.grad_accum_steps)
    fused = config.algorithm != "ppo" and len(micro) == 1
    with torch.no_grad(), accelerator.autocast():
        ref_logp = torch.cat(
            [response_logprobs(reference, seqs.rows(rows), share_prompts=True)[0] for rows in micro]
        )
        if not fused:
            old_logp = torch.cat(
                [response_logprobs(policy, seqs.rows(rows), share_prompts=True)[0] for rows in micro]
            )
            old_values = (
                torch.cat([response_values(value_model, seqs.rows(rows)) for rows in micro]) * mask
                if value_model is not None else None
            )  # fmt: skip
    # the training forward encodes each prompt once for its K samples where it can (see response_logprobs)
    share = not updater.checkpointing and accelerator.num_processes == 1
    if fused:
        with accelerator.autocast(), checkpointed_layers(updater.models, updater.checkpointing):
            train_logp, train_entropy = response_logprobs(
                policy, seqs, with_entropy=True, share_prompts=share
            )
            train_values = response_values(value_model, seqs) if value_model is not None else None
        old_logp = train_logp.detach()
        old_values = train_values.detach() * mask if train_values is not None else None

    # 5. per-token KL estimate and the shaped reward (1-β)·r at the end, -β·kl_t per token
    kl = (old_logp - ref_logp) * mask
    seq_kl = kl.sum(-1)
    check_finite(step, "KL", accelerator.reduce(seq_kl.sum(), "sum"), last_checkpoint)
    rewards = shaped_rewards(scores, kl, mask, config.beta)

    # 6. advantages and the update
    if config.algorithm == "ppo":
        assert old_values is not None and value_model is not None
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        losses = ppo_update(config, updater, policy, value_model, seqs, old_logp, old_values, advantages,
                            returns, step, last_checkpoint)  # fmt: skip
        return losses, seq_kl, old_logp
    if config.algorithm == "reinforce":
        assert old_values is not None
        returns = returns_to_go(rewards, mask, 1.0)  # γ = 1 (the paper)
        advantages = (returns - old_values) * mask  # baseline: the learned V(s_t)
    elif config.algorithm == "rloo":  # one advantage per sequence, on every one of its tokens
        returns = rewards.sum(-1)  # (1-β)·r - β·KL of the whole response
        advantages = rloo_advantages(returns, k)[:, None] * mask
    else:  # online DPO: no advantages; the best and worst sample of each prompt make a pair
        advantages = torch.zeros_like(mask)
        chosen, rejected, valid = best_worst_pairs(scores, k)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    # the whole rollout's counts: each micro-batch's loss is its share of the batch's
    tokens, pairs = mask.sum().clamp(min=1), None
    if config.algorithm == "online_dpo":
        pairs = valid.sum().clamp(min=1)

    def loss_of(rows: Rows) -> dict[str, torch.Tensor]:
        assert isinstance(rows, slice)
        m = mask[rows]
        if fused:
            logp, entropy, values = train_logp, train_entropy, train_values
        else:
            logp, entropy = response_logprobs(policy, seqs.rows(rows), with_entropy=True, share_prompts=share)
            values = response_values(value_model, seqs.rows(rows)) if value_model is not None else None
        zero = torch.zeros((), device=m.device)
        if config.algorithm == "reinforce":
            assert values is not None and old_values is not None
            policy_loss = -masked_mean(advantages[rows] * logp, m, tokens)
            v_loss = value_loss(values, old_values[rows], returns[rows], m, None, tokens)
        elif config.algorithm == "rloo":  # -A_i · log π(y_i) (summed over its tokens), mean over i
            policy_loss, v_loss = -(advantages[rows] * logp).sum() / n, zero
        else:  # the pairs of this micro-batch's prompts; indices relative to its first row
            groups = slice(rows.start // k, rows.stop // k)
            policy_loss = dpo_loss(logp.sum(-1), ref_logp[rows].sum(-1), chosen[groups] - rows.start,
                                   rejected[groups] - rows.start, valid[groups], config.dpo_beta, pairs)  # fmt: skip
            v_loss = zero
        assert entropy is not None
        loss = policy_loss + config.value_loss_coef * v_loss
        return {"policy_loss": policy_loss, "value_loss": v_loss, "loss": loss,
                "entropy": masked_mean(entropy, m, tokens)}  # fmt: skip

    return updater.step(micro, loss_of, step, last_checkpoint), seq_kl, old_logp


def sync_policy(
    accelerator: Any, policy: torch.nn.Module, tokenizer: Any, server: Any, sync_dir: Path, step: int
) -> None:
    """Give the rollout server the current policy: saved as `sync_dir/step-N` (written under a
    temporary name, then renamed), reloaded by every server, older folders deleted. Every process
    waits until the servers have it."""
    final, tmp = sync_dir / f"step-{step:08d}", sync_dir / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(accelerator, policy, tokenizer, tmp)  # collective; the main process writes
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


def ppo_update(
    config: RLConfig, updater: Updater, policy: torch.nn.Module, value_model: torch.nn.Module, seqs: Sequences,
    old_logp: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, step: int,
    last_checkpoint: Path | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, one
    optimizer step each (over `grad_accum_steps` micro-batches); returns the losses averaged over
    all minibatches."""
    mask = seqs.mask
    n = mask.shape[0]
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n)  # the global torch RNG: restored on resume
        for minibatch in order.tensor_split(min(config.num_minibatches, n)):
            minibatch = minibatch.to(mask.device)
            tokens = mask[minibatch].sum().clamp(min=1)  # the minibatch's: micro-batches take shares

            def loss_of(rows: Rows, tokens: torch.Tensor = tokens) -> dict[str, torch.Tensor]:
                m = mask[rows]
                logp, entropy = response_logprobs(policy, seqs.rows(rows), with_entropy=True)
                assert entropy is not None
                policy_loss, clip_fraction = ppo_policy_loss(
                    logp, old_logp[rows], advantages[rows], m, config.clip_range, tokens
                )
                values = response_values(value_model, seqs.rows(rows))
                v_loss = value_loss(
                    values, old_values[rows], returns[rows], m, config.value_clip_range, tokens
                )
                loss = policy_loss + config.value_loss_coef * v_loss
                return {
                    "policy_loss": policy_loss, "value_loss": v_loss, "loss": loss,
                    "entropy": masked_mean(entropy, m, tokens), "clip_fraction": clip_fraction,
                    # KL(old ‖ new), how far PPO moved
                    "approx_kl_old_new": masked_mean(old_logp[rows] - logp.detach(), m, tokens),
                }  # fmt: skip

            shares = updater.step(list(minibatch.tensor_split(config.grad_accum_steps)), loss_of, step,
                                  last_checkpoint)  # fmt: skip
            for name, value in shares.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            updates += 1
    return {name: torch.tensor(total / updates) for name, total in sums.items()}
