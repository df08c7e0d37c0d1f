"""RL from AI feedback, top to bottom (DESIGN §2.3-2.4): REINFORCE with a learned baseline, RLOO,
PPO and online DPO.

The objective (the paper's, β = 0.05 by default):

    J(θ) = E[(1 - β) · r(x, y) - β · KL(π_θ(·|x) ‖ π_ref(·|x))]

where π_ref is the frozen SFT model the policy starts from. Every step:

1. take `batch_size` prompts per process (sharded across processes like the other trainers);
2. sample `num_samples` (K) responses per prompt from the current policy (`generation.sample`,
   temperature 0.9, a new seed each step);
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
off (the update's log-probs are those the samples were drawn from); `whiten_advantages`
normalises the advantages over the batch's tokens. A
non-finite reward, KL or loss stops the run with one line naming the step and the quantity;
the last good checkpoint stays. Checkpoints hold the policy, the value model (`value/`), the
optimizer, scheduler, RNG states and the prompt position; `--resume` continues exactly.

Not here: sampling through an OpenAI-compatible server (RL samples in process only), and
gradient accumulation. DeepSpeed/FSDP are untested for RL (two trained models, one optimizer).

    openrlaif train rl --config configs/train/rl-tiny.yaml [--resume]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    pad_right,
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
    learning_rate: float = Field(1e-6, gt=0.0)
    value_learning_rate: float | None = Field(None, gt=0.0)  # default: learning_rate
    value_loss_coef: float = Field(0.5, ge=0.0)
    whiten_advantages: bool = False  # normalise advantages to mean 0, std 1 over the batch
    # PPO
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0)
    dpo_beta: float = Field(0.1, gt=0.0)  # online DPO: the β of the DPO loss (it replaces the KL penalty)
    value_clip_range: float | None = Field(0.2, gt=0.0)  # None: no value clipping
    ppo_epochs: int = Field(2, ge=1)
    num_minibatches: int = Field(2, ge=1)
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
        if self.grad_accum_steps != 1:
            raise ValueError("grad_accum_steps must be 1 for RL: raise batch_size or num_samples instead")
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
    valid: torch.Tensor, beta: float,
) -> torch.Tensor:  # fmt: skip
    """-mean log σ(β·Δ), Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)), over
    the valid pairs (sequence log-probs (N,))."""
    margin = policy_logp - ref_logp
    delta = margin[chosen] - margin[rejected]
    return -(torch.nn.functional.logsigmoid(beta * delta) * valid).sum() / valid.sum().clamp(min=1)


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
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate mean_t max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:  # fmt: skip
    """½·mean_t (V - G)², with PPO's clipping of V to old_V ± clip (the worse of the two errors)."""
    error = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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

        rm = RewardModel.from_pretrained(source.path or "", device=device)
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


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """N = prompts x K sampled sequences, right-padded, and what the update needs (all detached)."""

    input_ids: torch.Tensor  # (N, S) prompt + response + padding
    attention_mask: torch.Tensor  # (N, S)
    labels: torch.Tensor  # (N, S) response tokens, IGNORE_INDEX elsewhere
    mask: torch.Tensor  # (N, S-1) float: 1 where position t predicts a response token
    scores: torch.Tensor  # (N,) the reward source's r
    logp: torch.Tensor  # (N, S-1) log π_old of each response token
    ref_logp: torch.Tensor  # (N, S-1)
    values: torch.Tensor | None  # (N, S-1) V of the state before each response token


def build_sequences(samples: Sequence[Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    input_ids = pad_right(ids, pad_id)
    attention_mask = pad_right([[1] * len(x) for x in ids], 0)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, s in enumerate(samples):  # by position: pad may equal eos, and the eos is an action
        start = len(s.prompt_ids)
        labels[row, start : start + len(s.response_ids)] = torch.tensor(s.response_ids)
    return input_ids, attention_mask, labels


def policy_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels (position t predicts token t+1) and per-token entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logp = token_logprobs(logits, labels[:, 1:])
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logp, entropy


class TokenValueModel(ValueHeadModel):
    """The reward module's `ValueHeadModel` (same folder format), with a value at every position
    rather than at the last token only: V(s_t) for each state of the response."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


def value_forward(
    value_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """V at every position, (N, S-1): the value of the state before each next token. Called
    through the (possibly DDP-wrapped) module, so its gradients are all-reduced."""
    return value_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).float()[:, :-1]


# ---------------------------------------------------------------- training


def make_rl_optimizer(
    policy: torch.nn.Module, value_model: torch.nn.Module | None, config: RLConfig
) -> torch.optim.Optimizer:
    """AdamW over the policy and the value model; weight decay on matrices only."""
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
    return torch.optim.AdamW(groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def train_rl(
    config: RLConfig, resume: bool = False, show_progress: bool = True, *, judge: Any = None
) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly.
    `judge` replaces the configured judge (a `Judge` object, e.g. for tests)."""
    from transformers import AutoModelForCausalLM

    from openrlaif.generation import load_prompts, sample

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
    reward_fn = make_reward_fn(config, tokenizer, device, judge)

    loader = ShardedBatches(
        len(prompts), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )
    total_steps = plan_steps(config, loader, len(prompts), accelerator.num_processes)
    optimizer = make_rl_optimizer(policy, value_model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    if value_model is not None:
        policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    start_step = load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader) if checkpoint else 0
    trained = [policy] + ([value_model] if value_model is not None else [])
    parameters = [p for m in trained for p in m.parameters()]
    for m in trained:  # dropout off: the update's log-probs must be those the samples were drawn from
        m.eval()

    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, f"RL ({config.algorithm})",
                           show_progress)  # fmt: skip
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    k = config.num_samples
    logger.print(
        f"RL ({config.algorithm}, reward {config.reward.type}): {len(prompts)} prompts; {total_steps} steps of "
        f"{config.batch_size * accelerator.num_processes} prompts x {k} samples; β {config.beta}, temperature "
        f"{config.temperature}; {device}, mixed precision {accelerator.mixed_precision}"
        + (f"; resuming after step {start_step} from {checkpoint.path}" if checkpoint else "")
    )
    last_checkpoint = checkpoint.path if checkpoint else None
    throughput = Throughput()
    try:
        for step in range(start_step + 1, total_steps + 1):
            # 1-2. prompts and K samples each (a fresh seed per step; per-sample seeds as in `generate`)
            chunk = [prompts[i] for i in loader.next_batch()]
            unwrapped = accelerator.unwrap_model(policy)
            with accelerator.autocast():
                samples = sample(
                    unwrapped, tokenizer, [p.prompt for p in chunk], n=k, temperature=config.temperature,
                    max_new_tokens=config.max_new_tokens, top_p=config.top_p, seed=config.seed * 1_000_003 + step,
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

            # 4. log-probs of what was sampled, under the policy (old) and the reference; values
            input_ids, attention_mask, labels = (
                t.to(device) for t in build_sequences(samples, tokenizer.pad_token_id)
            )
            mask = (labels[:, 1:] != IGNORE_INDEX).float()
            with torch.no_grad(), accelerator.autocast():
                old_logp, _ = policy_forward(policy, input_ids, attention_mask, labels)
                ref_logp, _ = policy_forward(reference, input_ids, attention_mask, labels)
                old_values = (
                    value_forward(value_model, input_ids, attention_mask) * mask if value_model else None
                )
            rollout = Rollout(input_ids, attention_mask, labels, mask, scores, old_logp, ref_logp, old_values)

            # 5. per-token KL estimate and the shaped reward (1-β)·r at the end, -β·kl_t per token
            kl = (old_logp - ref_logp) * mask
            seq_kl = kl.sum(-1)
            check_finite(step, "KL", accelerator.reduce(seq_kl.sum(), "sum"), last_checkpoint)
            rewards = shaped_rewards(scores, kl, mask, config.beta)

            # 6. advantages and the update
            learning_rate = scheduler.get_last_lr()[0]
            if config.algorithm == "ppo":
                assert old_values is not None
                advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
                losses = ppo_update(config, accelerator, policy, value_model, optimizer, rollout, advantages,
                                    returns, parameters, step, last_checkpoint)  # fmt: skip
            else:
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
                with accelerator.autocast():
                    logp, entropy = policy_forward(policy, input_ids, attention_mask, labels)
                    if config.algorithm == "reinforce":
                        policy_loss = -masked_mean(advantages * logp, mask)
                        values = value_forward(value_model, input_ids, attention_mask)
                        v_loss = value_loss(values, old_values, returns, mask, None)
                    elif (
                        config.algorithm == "rloo"
                    ):  # -A_i · log π(y_i) (summed over its tokens), mean over i
                        policy_loss = -(advantages * logp).sum(-1).mean()
                        v_loss = torch.zeros((), device=device)
                    else:
                        policy_loss = dpo_loss(logp.sum(-1), ref_logp.sum(-1), chosen, rejected, valid,
                                               config.dpo_beta)  # fmt: skip
                        v_loss = torch.zeros((), device=device)
                    loss = policy_loss + config.value_loss_coef * v_loss
                losses = {"policy_loss": policy_loss.detach(), "value_loss": v_loss.detach(), "loss": loss.detach(),
                          "entropy": masked_mean(entropy, mask)}  # fmt: skip
                check_finite(step, "loss", accelerator.reduce(loss.detach(), "mean"), last_checkpoint)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
                check_finite(step, "gradient norm", grad_norm, last_checkpoint)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses["grad_norm"] = torch.as_tensor(float(grad_norm))
            scheduler.step()
            ids_log.write(step, [f"{p.id}-{i}" for p in chunk for i in range(k)])

            # Log: means over all processes; samples and tokens summed.
            lengths = mask.sum(-1)
            local = torch.stack([
                scores.mean(), scores.std(unbiased=False), seq_kl.mean(), lengths.mean(),
                *[v.to(device).float() for v in losses.values()],
                torch.tensor(float(len(samples)), device=device), (attention_mask.sum()).float(),
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


def ppo_update(
    config: RLConfig, accelerator: Any, policy: torch.nn.Module, value_model: Any, optimizer: torch.optim.Optimizer,
    rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, parameters: list[torch.nn.Parameter],
    step: int, last_checkpoint: Path | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, one
    optimizer step each; returns the losses averaged over all minibatches."""
    n = rollout.input_ids.shape[0]
    if config.whiten_advantages:
        advantages = whiten(advantages, rollout.mask)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n)  # the global torch RNG: restored on resume
        for idx in order.chunk(min(config.num_minibatches, n)):
            idx = idx.to(rollout.input_ids.device)
            ids, att, lab, mask = (rollout.input_ids[idx], rollout.attention_mask[idx], rollout.labels[idx],
                                   rollout.mask[idx])  # fmt: skip
            with accelerator.autocast():
                logp, entropy = policy_forward(policy, ids, att, lab)
                policy_loss, clip_fraction = ppo_policy_loss(
                    logp, rollout.logp[idx], advantages[idx], mask, config.clip_range
                )
                values = value_forward(value_model, ids, att)
                assert rollout.values is not None
                v_loss = value_loss(values, rollout.values[idx], returns[idx], mask, config.value_clip_range)
                loss = policy_loss + config.value_loss_coef * v_loss
            check_finite(step, "loss", accelerator.reduce(loss.detach(), "mean"), last_checkpoint)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
            check_finite(step, "gradient norm", grad_norm, last_checkpoint)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            approx_kl = masked_mean(
                rollout.logp[idx] - logp.detach(), mask
            )  # KL(old ‖ new), how far PPO moved
            for name, value in (("policy_loss", policy_loss), ("value_loss", v_loss), ("loss", loss),
                                ("entropy", masked_mean(entropy, mask)), ("clip_fraction", clip_fraction),
                                ("approx_kl_old_new", approx_kl), ("grad_norm", grad_norm)):  # fmt: skip
                sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(value).detach())
            updates += 1
    return {name: torch.tensor(total / updates) for name, total in sums.items()}
