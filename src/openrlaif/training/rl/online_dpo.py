"""Online DPO: DPO on pairs of fresh samples, no value model.

Of each prompt's K fresh samples, the one with the highest reward is chosen and the lowest
rejected (with `judge_pairwise`, the judge's win rates pick them); the loss is the sigmoid DPO
loss -log σ(β_dpo·Δ) against the reference (`training/losses.dpo_loss` with p = 1, the loss the
DPO trainer uses; `dpo_beta` takes the KL penalty's place). Prompts whose samples all tie are
skipped. One optimizer step per rollout.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from openrlaif.training.losses import dpo_loss
from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.losses import masked_mean
from openrlaif.training.rl.rollout import Rollout, Rows
from openrlaif.training.rl.updater import Updater


class OnlineDPOConfig(RLBaseConfig):
    """Online DPO settings: the shared RL ones (num_samples >= 2: pairs of samples) and DPO's β."""

    algorithm: Literal["online_dpo"] = "online_dpo"
    min_samples: ClassVar[int] = 2

    dpo_beta: float = Field(0.1, gt=0.0)  # the β of the DPO loss (it replaces the KL penalty)


def best_worst_pairs(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO's pair per prompt: (chosen = the highest reward, rejected = the lowest, valid =
    the two differ); indices into the prompt-major samples."""
    grouped = scores.view(-1, k)
    offset = torch.arange(grouped.shape[0], device=scores.device) * k
    chosen, rejected = grouped.argmax(-1) + offset, grouped.argmin(-1) + offset
    return chosen, rejected, (grouped.max(-1).values > grouped.min(-1).values).float()


def online_dpo_loss(
    policy_logp: torch.Tensor, ref_logp: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
    valid: torch.Tensor, beta: float, denominator: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """-mean log σ(β·Δ), Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)), over
    the valid pairs (sequence log-probs (N,)). `denominator`: the whole batch's number of valid
    pairs, when these pairs are one micro-batch of it (the micro-batches' losses then sum to the
    batch's)."""
    loss, _, _ = dpo_loss(
        policy_logp[chosen], policy_logp[rejected], ref_logp[chosen], ref_logp[rejected],
        torch.ones_like(valid), beta,
    )  # fmt: skip
    count = valid.sum().clamp(min=1) if denominator is None else denominator
    return (loss * valid).sum() / count


def update(config: OnlineDPOConfig, updater: Updater, rollout: Rollout) -> dict[str, torch.Tensor]:
    """One optimizer step over the rollout's micro-batches; returns the logged losses."""
    mask, k = rollout.mask, rollout.num_samples
    chosen, rejected, valid = best_worst_pairs(rollout.scores, k)
    tokens = mask.sum().clamp(min=1)  # the whole rollout's counts: each micro-batch's loss is its share
    pairs = valid.sum().clamp(min=1)

    def loss_of(rows: Rows) -> dict[str, torch.Tensor]:
        assert isinstance(rows, slice)  # whole prompts: a micro-batch's pairs are its prompts'
        m = mask[rows]
        logp, entropy, _ = rollout.forward(rows)
        groups = slice(rows.start // k, rows.stop // k)  # indices relative to the micro-batch's first row
        policy_loss = online_dpo_loss(logp.sum(-1), rollout.ref_logp[rows].sum(-1), chosen[groups] - rows.start,
                                      rejected[groups] - rows.start, valid[groups], config.dpo_beta, pairs)  # fmt: skip
        return {"policy_loss": policy_loss, "value_loss": torch.zeros((), device=m.device), "loss": policy_loss,
                "entropy": masked_mean(entropy, m, tokens)}  # fmt: skip

    return updater.step(rollout.micro_batches, loss_of, rollout.step, rollout.last_checkpoint)
