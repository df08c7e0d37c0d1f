"""The end of an optimizer step, the same in every trainer.

- `optimizer_step`: the loss must be finite, the gradient norm is clipped (and must be finite),
  the optimizer steps and the gradients are cleared (SFT, reward model, DPO and RL).
- `start_steps`: what the supervised trainers' loops step with (the step count, AdamW and its
  schedule, the model prepared by accelerate, the resumed state, the logs);
- `finish_step`: the supervised trainers' whole epilogue after the backward passes: the optimizer
  step, the schedule, the example ids, the metric row and the progress bar.
- around the loop, `StepParts`' methods: `plan_line` (the run's plan, printed before training),
  `log_held_out` (a held-out evaluation checked, logged and printed), `eval_due` / `save_due`
  (when to evaluate and to checkpoint), `save` (the checkpoint) and `finish` (the final model
  folder, the "done" line and the result).

Each trainer's loop stays in its own module, top to bottom; it calls `finish_step` where its
micro-batches are done, then evaluates and checkpoints as it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openrlaif.training.accelerator import training_precision
from openrlaif.training.batching import ShardedBatches, plan_steps
from openrlaif.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_model_folder
from openrlaif.training.config import TrainConfig
from openrlaif.training.errors import check_finite
from openrlaif.training.metrics import ExampleIdLog, MetricsLogger, Throughput, format_metrics
from openrlaif.training.optim import make_optimizer, make_scheduler
from openrlaif.training.run import TrainResult, export_merged, simulate_kill


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
    loader: ShardedBatches
    output_dir: Path
    checkpoint: Checkpoint | None  # the one the run resumes from
    throughput: Throughput = field(default_factory=Throughput)  # restarted where training time starts

    def plan_line(
        self, title: str, unit: str, n_train: int, n_held_out: int, chat: bool, extra: str = "", after: str = ""
    ) -> str:  # fmt: skip
        """The run's plan, printed before training: the data (`unit`: what an example is called,
        plural), `extra` (a clause of the trainer's own after the data), the steps and the batch,
        the device, `after` (another clause of the trainer's own) and where a resumed run continues."""
        config, accelerator = self.config, self.accelerator
        global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
        return (
            f"{title}: {n_train} training / {n_held_out} held-out {unit}{' (chat template)' if chat else ''}; "
            + (f"{extra}; " if extra else "")
            + f"{self.total_steps} steps of {global_batch} {unit} ({config.batch_size} x "
            f"{config.grad_accum_steps} accumulation x {accelerator.num_processes} process(es)); "
            f"{training_precision(config).line()}"
            + (f"; {after}" if after else "")
            + (f"; resuming after step {self.start_step} from {self.checkpoint.path}" if self.checkpoint else "")
        )  # fmt: skip

    def log_held_out(self, step: int, metrics: dict[str, float], last_checkpoint: Path | None) -> None:
        """The held-out `metrics` of step `step` (0: before training, when the loss is not checked;
        after it, the loss must be finite), logged without their NaN entries (an accuracy over no
        pairs) and printed."""
        if step > 0:
            check_finite(step, "held-out loss", metrics["eval/loss"], last_checkpoint)
        self.logger.log(step, {k: v for k, v in metrics.items() if not math.isnan(v)})
        when = f"step {step}" if step > 0 else "step 0 (before training)"
        self.logger.print(f"{when}: {format_metrics(metrics)}")

    def eval_due(self, step: int) -> bool:
        """Whether step `step` ends with a held-out evaluation: every `eval_every` steps and at the end."""
        every = self.config.eval_every
        return step == self.total_steps or bool(every and step % every == 0)

    def save_due(self, step: int) -> bool:
        """Whether step `step` ends with a checkpoint: every `save_every` steps and at the end."""
        return step % self.config.save_every == 0 or step == self.total_steps

    def save(self, step: int, tokenizer: Any) -> Path:
        """Checkpoint `step-N` (`save_checkpoint`: the model, the optimizer, the schedule and the
        data order; the oldest beyond `keep_checkpoints` removed). Returns its path."""
        return save_checkpoint(
            self.accelerator, self.output_dir, step, self.model, tokenizer, self.optimizer, self.scheduler,
            self.loader, self.config.keep_checkpoints,
        )  # fmt: skip

    def finish(
        self, tokenizer: Any, title: str, first_metrics: dict[str, float] | None,
        final_metrics: dict[str, float] | None, note: str = "", write_extra: Callable[[Path], None] | None = None,
    ) -> TrainResult:  # fmt: skip
        """After the loop: the model folder `output_dir/model` (every process; `write_extra` adds the
        trainer's own files to it on the main process), the processes wait for each other, the
        "done" line (`note` at its end) and the result."""
        accelerator = self.accelerator
        model_dir = self.output_dir / "model"
        save_model_folder(accelerator, self.model, tokenizer, model_dir, merged=export_merged(self.config))
        if write_extra is not None and accelerator.is_main_process:
            write_extra(model_dir)
        accelerator.wait_for_everyone()
        self.logger.print(f"{title} done: {self.total_steps} steps; model -> {model_dir}{note}")
        return TrainResult(
            output_dir=self.output_dir, model_dir=model_dir, steps=self.total_steps,
            metrics=final_metrics or {}, first_metrics=first_metrics, model=accelerator.unwrap_model(self.model),
        )  # fmt: skip


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
    start_step = (
        load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader, [model]) if checkpoint else 0
    )
    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, title, show_progress)
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    return StepParts(
        accelerator, model, optimizer, scheduler, config, total_steps, start_step, logger, ids_log, loader,
        output_dir, checkpoint,
    )  # fmt: skip


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
