"""RL's optimizer and its step: one AdamW over the policy and the value model, the two handed to
accelerate (`prepare_trained`), and `Updater.step`, one optimizer step over micro-batches whose
losses are shares of the batch's."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openrlaif.training.accelerator import uses_fsdp
from openrlaif.training.optim import adamw
from openrlaif.training.rl.config import RLBaseConfig, ValueModelConfig
from openrlaif.training.rl.rollout import Rows, checkpointed_layers
from openrlaif.training.step import optimizer_step


def make_rl_optimizer(
    policy: torch.nn.Module, value_model: torch.nn.Module | None, config: RLBaseConfig
) -> torch.optim.Optimizer:
    """AdamW over the policy and the value model (at `value_learning_rate`, default the policy's);
    fused and with weight decay on matrices only, as every trainer's (`training/optim.py`)."""
    models = [(policy, config.learning_rate)]
    if value_model is not None:
        assert isinstance(config, ValueModelConfig)
        models.append((value_model, config.value_learning_rate or config.learning_rate))
    return adamw(config, models)


class TrainedTogether(torch.nn.Module):
    """The policy and the value model as one module, for FSDP: accelerate shards one model per
    optimizer. Each of the two is its own FSDP unit (as are their transformer blocks), so calling
    either directly gathers its own weights; this module itself is never called."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module) -> None:
        super().__init__()
        self.policy, self.value_model = policy, value_model
        blocks = {name for m in (policy, value_model) for name in getattr(m, "_no_split_modules", None) or []}
        # accelerate's TRANSFORMER_BASED_WRAP wraps every module whose class is named here
        self._no_split_modules = sorted(blocks | {type(policy).__name__, type(value_model).__name__})


def prepare_trained(
    accelerator: Any,
    policy: torch.nn.Module,
    value_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.optim.Optimizer]:
    """The policy, the value model (if any) and their optimizer prepared by accelerate (DDP wraps
    each model; FSDP shards the two as one `TrainedTogether`)."""
    if value_model is None:
        policy, optimizer = accelerator.prepare(policy, optimizer)
        return policy, None, optimizer
    if uses_fsdp(accelerator):
        both, optimizer = accelerator.prepare(TrainedTogether(policy, value_model), optimizer)
        return both.policy, both.value_model, optimizer
    policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    return policy, value_model, optimizer


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
        parameters = [p for model in self.models for p in model.parameters()]
        grad_norm = optimizer_step(
            accelerator, parameters, self.optimizer, self.max_grad_norm, step,
            accelerator.reduce(totals["loss"], "mean"), last_checkpoint,
        )  # fmt: skip
        return totals | {"grad_norm": torch.as_tensor(float(grad_norm))}
