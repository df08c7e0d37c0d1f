"""REINFORCE with a learned baseline (the paper's algorithm, the default).

Returns G_t = Σ_{s≥t} r_s of the KL-shaped rewards (γ = 1), advantage A_t = G_t - V(s_t) from
the value model, policy loss -mean_t(A_t · log π(y_t)), value loss ½·mean_t(V - G)². The value
model is a separate copy of the SFT model's transformer body with a scalar head on every
position (`TokenValueModel`, initialised from SFT as in the paper; not shared with the policy,
so the value loss cannot disturb the policy's representation). One optimizer step per rollout.
"""

from __future__ import annotations

from typing import Literal

import torch

from openrlaif.training.rl.config import ValueModelConfig
from openrlaif.training.rl.losses import masked_mean, token_advantages, value_loss
from openrlaif.training.rl.rollout import Rollout, Rows
from openrlaif.training.rl.updater import Updater


class ReinforceConfig(ValueModelConfig):
    """REINFORCE settings: the shared RL ones and the value model's."""

    algorithm: Literal["reinforce"] = "reinforce"


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s-t} r_s within each response (0 at padding)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def update(config: ReinforceConfig, updater: Updater, rollout: Rollout) -> dict[str, torch.Tensor]:
    """One optimizer step over the rollout's micro-batches; returns the logged losses."""
    mask, old_values = rollout.mask, rollout.old_values
    assert old_values is not None
    returns = returns_to_go(rollout.rewards, mask, 1.0)  # γ = 1 (the paper)
    baselined = returns - old_values  # baseline: the learned V(s_t)
    advantages = token_advantages(baselined, mask, config.whiten_advantages)
    tokens = mask.sum().clamp(min=1)  # the whole rollout's: each micro-batch's loss is its share

    def loss_of(rows: Rows) -> dict[str, torch.Tensor]:
        m = mask[rows]
        logp, entropy, values = rollout.forward(rows)
        assert values is not None
        policy_loss = -masked_mean(advantages[rows] * logp, m, tokens)
        v_loss = value_loss(values, old_values[rows], returns[rows], m, None, tokens)
        loss = policy_loss + config.value_loss_coef * v_loss
        return {"policy_loss": policy_loss, "value_loss": v_loss, "loss": loss,
                "entropy": masked_mean(entropy, m, tokens)}  # fmt: skip

    return updater.step(rollout.micro_batches, loss_of, rollout.step, rollout.last_checkpoint)
