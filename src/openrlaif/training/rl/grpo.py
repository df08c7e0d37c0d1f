"""GRPO (Shao et al., 2024) and the variants people compare it with, as settings.

Each prompt's K samples are a group. A sample's return R_i is its KL-shaped return Σ_t r_t
(`kl_in: reward`, the RLAIF paper's J = (1-β)·r - β·KL) or its score alone (`kl_in: loss`).
Its advantage is A_i = (R_i - mean of its group) / (scale + 1e-4), the scale being

    scale_rewards: group   the std of its group's returns (GRPO)
                   batch   the std of every return of the batch (more robust for small groups)
                   none    1: no scaling (Dr. GRPO, Liu et al., 2025)

and is put on every token of the sample. The loss per token is the clipped surrogate

    -min(ρ_t·A_i, clip(ρ_t, 1 - clip_range, 1 + clip_range_high)·A_i),   ρ_t = π(y_t) / π_old(y_t)

(`clip_range_high` > `clip_range`: DAPO's clip-higher; None: symmetric), plus with `kl_in: loss`
β·k3_t, k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, positive KL estimator).
Tokens are aggregated

    loss_aggregation: sequence   mean over each sample's tokens, then over samples (GRPO)
                      token      mean over every token of the (mini)batch (DAPO: long samples weigh more)

`num_iterations` passes over each rollout (μ in the paper), each in `num_minibatches` shuffled
minibatches, one optimizer step each; with one of each, the update is a single step whose
ratio is 1 (its gradient is the policy gradient) and no separate old-log-prob pass runs.
The std's are Bessel-corrected (as TRL's) and `batch` is over this process's batch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.losses import masked_mean, whiten
from openrlaif.training.rl.rollout import Rollout, Rows
from openrlaif.training.rl.updater import Updater

ADVANTAGE_EPS = 1e-4  # TRL's and the GRPO paper's code's: a group of equal returns gets 0, not NaN


class GRPOConfig(RLBaseConfig):
    """GRPO settings: the shared RL ones (num_samples >= 2: a group) and the variants' switches."""

    algorithm: Literal["grpo"] = "grpo"
    min_samples: ClassVar[int] = 2

    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    kl_in: Literal["reward", "loss"] = (
        "reward"  # the KL penalty: folded into R (the paper's) or a k3 loss term
    )
    clip_range: float = Field(0.2, gt=0.0, lt=1.0)  # ε (the lower bound 1 - ε; the upper too unless set)
    clip_range_high: float | None = Field(None, gt=0.0)  # clip-higher (DAPO: 0.28)
    num_iterations: int = Field(1, ge=1)  # passes over each rollout (μ)
    num_minibatches: int = Field(1, ge=1)  # optimizer steps per pass

    @property
    def one_update_per_rollout(self) -> bool:  # type: ignore[override]  # a setting here, not a constant
        return self.num_iterations == 1 and self.num_minibatches == 1

    def check_micro_batches(self) -> None:
        """The shared check, and: each of the `num_minibatches` minibatches of a step (split into
        `grad_accum_steps` micro-batches of rows) needs a sequence for every micro-batch."""
        super().check_micro_batches()
        rows = self.batch_size * self.num_samples // self.num_minibatches
        if rows < self.grad_accum_steps or self.num_minibatches > self.batch_size * self.num_samples:
            raise ValueError(
                f"num_minibatches {self.num_minibatches} x grad_accum_steps {self.grad_accum_steps} needs at least "
                f"that many sequences per step (batch_size x num_samples = {self.batch_size * self.num_samples})"
            )


def group_advantages(returns: torch.Tensor, k: int, scale: str) -> torch.Tensor:
    """(R_i - mean of its group of k) / (std + 1e-4), the std being its group's, the batch's, or 1
    (`scale` group | batch | none); samples prompt-major."""
    grouped = returns.view(-1, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(-1, keepdim=True) + ADVANTAGE_EPS)
    elif scale == "batch":
        centred = centred / (returns.std() + ADVANTAGE_EPS)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1 per token: KL(π ‖ π_ref) in expectation, never negative."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token -min(ρ·A, clip(ρ, 1 - low, 1 + high)·A), and whether the clip was taken."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, how: str, rows: int, tokens: torch.Tensor
) -> torch.Tensor:
    """A micro-batch's share of the (mini)batch's loss: `sequence` sums each sample's token mean and
    divides by the minibatch's `rows`; `token` sums the tokens and divides by its `tokens`."""
    if how == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows
    return (per_token * mask).sum() / tokens


def update(config: GRPOConfig, updater: Updater, rollout: Rollout) -> dict[str, torch.Tensor]:
    """`num_iterations` passes of `num_minibatches` optimizer steps over the rollout; returns the
    logged losses averaged over the steps."""
    mask, old_logp, ref_logp = rollout.mask, rollout.old_logp, rollout.ref_logp
    n = mask.shape[0]
    returns = rollout.rewards.sum(-1) if config.kl_in == "reward" else rollout.scores
    advantages = group_advantages(returns, rollout.num_samples, config.scale_rewards)[:, None] * mask
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    high = config.clip_range if config.clip_range_high is None else config.clip_range_high
    beta = config.beta if config.kl_in == "loss" else 0.0
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(config.num_iterations):
        if config.one_update_per_rollout:  # the rollout's own micro-batches: the fused forward
            minibatches: list[list[Rows]] = [list(rollout.micro_batches)]
        else:
            order = torch.randperm(n).to(mask.device)  # the global torch RNG: restored on resume
            minibatches = [
                list(mb.tensor_split(config.grad_accum_steps))
                for mb in order.tensor_split(config.num_minibatches)
            ]
        for micro in minibatches:
            rows_in = sum(_count(r, n) for r in micro)
            tokens = sum(mask[r].sum() for r in micro).clamp(min=1)  # type: ignore[union-attr]

            def loss_of(
                rows: Rows, rows_in: int = rows_in, tokens: torch.Tensor = tokens
            ) -> dict[str, torch.Tensor]:
                m = mask[rows]
                logp, entropy, _ = rollout.forward(rows)
                surrogate, clipped = clipped_surrogate(
                    logp, old_logp[rows], advantages[rows], config.clip_range, high
                )
                kl = k3_kl(logp, ref_logp[rows])
                per_token = surrogate + beta * kl if beta > 0 else surrogate
                loss = aggregate(per_token, m, config.loss_aggregation, rows_in, tokens)
                return {
                    "policy_loss": aggregate(surrogate, m, config.loss_aggregation, rows_in, tokens), "loss": loss,
                    "value_loss": torch.zeros((), device=m.device), "kl_k3": masked_mean(kl.detach(), m, tokens),
                    "entropy": masked_mean(entropy, m, tokens), "clip_fraction": masked_mean(clipped, m, tokens),
                }  # fmt: skip

            shares = updater.step(micro, loss_of, rollout.step, rollout.last_checkpoint)
            for name, value in shares.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            updates += 1
    return {name: torch.tensor(total / updates) for name, total in sums.items()}


def _count(rows: Rows, n: int) -> int:
    """How many rows a micro-batch holds (a slice of the rollout, or row indices)."""
    return len(range(n)[rows]) if isinstance(rows, slice) else int(rows.numel())
