"""The preference losses shared by the reward model, DPO and online DPO.

With a probability p that the chosen response is better and a margin m between the chosen and
the rejected one (reward model: r_c - r_r; DPO: β·Δ of the implicit rewards), the loss is the
cross-entropy between p and σ(m):

    L = -[p · log σ(m) + (1 - p) · log σ(-m)]

computed with `logsigmoid` (no overflow for large margins); p = 1 is the Bradley-Terry / sigmoid
DPO loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-pair L = -[p · log σ(r_c - r_r) + (1 - p) · log σ(r_r - r_c)] (DESIGN §2.2)."""
    margin = r_chosen - r_rejected
    return -(p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    p: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair soft-label DPO loss and the implicit rewards β·(log π - log π_ref) of chosen and
    rejected: `soft_label_loss` of the implicit rewards, whose margin is βΔ with
    Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)) (sequence log-probs)."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    return soft_label_loss(reward_chosen, reward_rejected, p), reward_chosen, reward_rejected
