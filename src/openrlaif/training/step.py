"""The end of an optimizer step, the same in every trainer.

- `optimizer_step`: the loss must be finite, the gradient norm is clipped (and must be finite),
  the optimizer steps and the gradients are cleared (SFT, reward model, DPO and RL).
- `start_steps`: what the supervised trainers' loops step with (the step count, AdamW and its
  schedule, the model prepared by accelerate, the resumed state, the logs);
- `finish_step`: the supervised trainers' whole epilogue after the backward passes: the optimizer
  step, the schedule, the example ids, the metric row and the progress bar.

Each trainer's loop stays in its own module, top to bottom; it calls `finish_step` where its
micro-batches are done, then evaluates and checkpoints as it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openrlaif.training.batching import ShardedBatches, plan_steps
from openrlaif.training.checkpoint import Checkpoint, load_checkpoint
from openrlaif.training.config import TrainConfig
from openrlaif.training.errors import check_finite
from openrlaif.training.metrics import ExampleIdLog, MetricsLogger, Throughput
from openrlaif.training.optim import make_optimizer, make_scheduler
from openrlaif.training.run import simulate_kill


def optimizer_step(
    accelerator: Any, parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None, step: int, loss: float | torch.Tensor, last_checkpoint: Path | None,
) -> torch.Tensor:  # fmt: skip
    """Check the loss before the optimizer can use it, clip the gradient norm (the norm is
    returned; None in the config clips nothing but still measures it), step and clear the gradients."""
    check_finite(step, "loss", loss, last_checkpoint)
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm or math.inf)
    check_finite(step, "gradient norm", grad_norm, last_checkpoint)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class StepParts:
    """What `finish_step` works with, made once before a supervised trainer's loop (`start_steps`)."""

    accelerator: Any
    model: torch.nn.Module  # the trained (possibly DDP-wrapped) model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    total_steps: int
    start_step: int  # the step a resumed run continues after (0: a new run)
    logger: MetricsLogger
    ids_log: ExampleIdLog
    throughput: Throughput = field(default_factory=Throughput)  # restarted where training time starts


def start_steps(
    config: TrainConfig, accelerator: Any, model: torch.nn.Module, loader: ShardedBatches, n_train: int,
    output_dir: Path, checkpoint: Checkpoint | None, title: str, show_progress: bool,
) -> StepParts:  # fmt: skip
    """The step count, AdamW and its schedule, the model and optimizer prepared by accelerate
    (`parts.model` is the one to train), the state of `checkpoint` restored, and the logs."""
    total_steps = plan_steps(config, loader, n_train, accelerator.num_processes)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader) if checkpoint else 0
    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, title, show_progress)
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    return StepParts(
        accelerator, model, optimizer, scheduler, config, total_steps, start_step, logger, ids_log
    )


def finish_step(
    parts: StepParts, step: int, loss: float, metrics: dict[str, float], samples: float, tokens: float,
    ids: list[str], last_checkpoint: Path | None, progress: str,
) -> None:  # fmt: skip
    """After the backward passes of step `step`: the optimizer step (`optimizer_step`, on `loss`
    over all processes), the schedule, the ids trained on, then the metric row (`metrics`, the
    learning rate of the step, the gradient norm, samples and tokens per second over all
    processes) every `log_every` steps and at the end, and `progress` on the bar."""
    config = parts.config
    grad_norm = optimizer_step(
        parts.accelerator, parts.model.parameters(), parts.optimizer, config.max_grad_norm, step, loss,
        last_checkpoint,
    )  # fmt: skip
    learning_rate = float(parts.scheduler.get_last_lr()[0])  # the rate this step used
    parts.scheduler.step()
    parts.ids_log.write(step, ids)

    row: dict[str, float] = {**metrics, "train/learning_rate": learning_rate}
    if grad_norm is not None:
        row["train/grad_norm"] = float(grad_norm)
    row |= {f"train/{k}": v for k, v in parts.throughput.rates(samples, tokens).items()}
    if step % config.log_every == 0 or step == parts.total_steps:
        parts.logger.log(step, row)
    parts.logger.advance(step, progress)
    simulate_kill(step)
