"""Loss pieces the RL algorithms share: masked means over response tokens (a micro-batch's share
of the batch's mean), advantage whitening (`token_advantages`: advantages put on the response
tokens, whitened when asked), and the value model's (optionally clipped) loss.

Per-token tensors are (N, R) over response tokens only, with a float `mask` (1 = a real token).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked tokens; with `denominator` (the whole batch's token count) the share of
    a micro-batch, so that the micro-batches' shares sum to the batch's mean."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked tokens (`whiten_advantages`); 0 at padding."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor, whiten_advantages: bool) -> torch.Tensor:
    """`advantages` (per token (N, R), or per sequence (N, 1)) on the response tokens, 0 at
    padding, and whitened over them with `whiten_advantages`."""
    advantages = advantages * mask
    return whiten(advantages, mask) if whiten_advantages else advantages


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
