"""The optimiser and the learning-rate schedule: AdamW with weight decay on matrices only (as in
nanoGPT), linear warmup, then linear or cosine decay to 0, or a constant rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from openrlaif.training.config import TrainConfig


def adamw(config: TrainConfig, models: Sequence[tuple[torch.nn.Module, float]]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of each (model, learning rate), fused where the device
    has the kernel; weight decay on matrices (dim >= 2) only."""
    groups: list[dict[str, Any]] = []
    for model, lr in models:
        params = [p for p in model.parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
        ]
    params = [p for group in groups for p in group["params"]]
    # fused: one kernel for the whole update (CPU and CUDA), as transformers' default `adamw_torch_fused`
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused
    )


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over one model at `learning_rate` (SFT, reward model, DPO)."""
    return adamw(config, [(model, config.learning_rate)])


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear/cosine decay to 0, or constant.
    Stepped once per optimizer step (not passed through accelerate, which would step it once per process)."""
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
