"""PPO: clipped policy updates with GAE advantages from a value model.

GAE(γ, λ) advantages from the value model's values before the update, then `ppo_epochs` passes
over the rollout in `num_minibatches` shuffled minibatches, each one optimizer step (over
`grad_accum_steps` micro-batches) on the clipped surrogate max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))
(ρ = π/π_old per token) plus the clipped value loss.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from openrlaif.training.rl.config import ValueModelConfig
from openrlaif.training.rl.losses import masked_mean, value_loss, whiten
from openrlaif.training.rl.rollout import Rollout, Rows
from openrlaif.training.rl.updater import Updater


class PPOConfig(ValueModelConfig):
    """PPO settings: the shared RL ones, the value model's and PPO's own."""

    algorithm: Literal["ppo"] = "ppo"
    one_update_per_rollout: ClassVar[bool] = False

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0)
    value_clip_range: float | None = Field(0.2, gt=0.0)  # None: no value clipping
    ppo_epochs: int = Field(2, ge=1)

    def check_micro_batches(self) -> None:
        """Accumulation splits each minibatch into micro-batches: every one needs a sequence."""
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


def update(config: PPOConfig, updater: Updater, rollout: Rollout) -> dict[str, torch.Tensor]:
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, one
    optimizer step each (over `grad_accum_steps` micro-batches); returns the losses averaged over
    all minibatches."""
    mask, old_logp, old_values = rollout.mask, rollout.old_logp, rollout.old_values
    assert old_values is not None
    advantages, returns = gae(rollout.rewards, old_values, mask, config.gamma, config.lam)
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
                logp, entropy, values = rollout.forward(rows)
                assert values is not None
                policy_loss, clip_fraction = ppo_policy_loss(
                    logp, old_logp[rows], advantages[rows], m, config.clip_range, tokens
                )
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

            shares = updater.step(list(minibatch.tensor_split(config.grad_accum_steps)), loss_of, rollout.step,
                                  rollout.last_checkpoint)  # fmt: skip
            for name, value in shares.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            updates += 1
    return {name: torch.tensor(total / updates) for name, total in sums.items()}
