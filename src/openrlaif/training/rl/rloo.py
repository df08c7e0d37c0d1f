"""RLOO: REINFORCE with a leave-one-out baseline, no value model.

The sequence return R_i = (1 - β)·r_i - β·KL_i (the KL-shaped rewards summed over the response),
baseline = the mean of R over the other K-1 samples of the same prompt, loss
-mean_i((R_i - b_i) · Σ_t log π(y_i,t)). One optimizer step per rollout.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.losses import masked_mean, token_advantages
from openrlaif.training.rl.rollout import Rollout, Rows
from openrlaif.training.rl.updater import Updater


class RLOOConfig(RLBaseConfig):
    """RLOO settings: the shared RL ones (num_samples >= 2: each sample's baseline is the others')."""

    algorithm: Literal["rloo"] = "rloo"
    min_samples: ClassVar[int] = 2


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """R_i minus the mean R of the other k-1 samples of its prompt (samples prompt-major)."""
    grouped = returns.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def update(config: RLOOConfig, updater: Updater, rollout: Rollout) -> dict[str, torch.Tensor]:
    """One optimizer step over the rollout's micro-batches; returns the logged losses."""
    mask = rollout.mask
    n = mask.shape[0]
    returns = rollout.rewards.sum(-1)  # (1-β)·r - β·KL of the whole response
    # one advantage per sequence, on every one of its tokens
    advantages = token_advantages(
        rloo_advantages(returns, rollout.num_samples)[:, None], mask, config.whiten_advantages
    )
    tokens = mask.sum().clamp(min=1)  # the whole rollout's: each micro-batch's entropy is its share

    def loss_of(rows: Rows) -> dict[str, torch.Tensor]:
        m = mask[rows]
        logp, entropy, _ = rollout.forward(rows)
        # -A_i · log π(y_i) (summed over its tokens), mean over i
        policy_loss = -(advantages[rows] * logp).sum() / n
        return {"policy_loss": policy_loss, "value_loss": torch.zeros((), device=m.device), "loss": policy_loss,
                "entropy": masked_mean(entropy, m, tokens)}  # fmt: skip

    return updater.step(rollout.micro_batches, loss_of, rollout.step, rollout.last_checkpoint)
