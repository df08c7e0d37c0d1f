"""A training run's frame: its output folder (one writer at a time, the checkpoint to resume
from, the resolved config), the opening every supervised trainer shares (`start_run`, the data
read by `read_examples`), and what a trainer returns (`TrainResult`)."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import yaml

from openrlaif.config import check_trackers
from openrlaif.data.datasets import BUILTIN_DATASETS, load_pairs
from openrlaif.data.io import read_records, write_text_atomic
from openrlaif.data.lock import one_writer
from openrlaif.data.records import Pair
from openrlaif.errors import ConfigError
from openrlaif.models.loading import quiet_transformers
from openrlaif.models.logprobs import logits_chunk_mib
from openrlaif.models.lora import LoRATask, add_lora, load_adapter_weights
from openrlaif.models.names import resolve_model_path
from openrlaif.training.accelerator import make_accelerator, set_seed
from openrlaif.training.batching import split_held_out
from openrlaif.training.card import write_run_card
from openrlaif.training.checkpoint import Checkpoint, latest_checkpoint
from openrlaif.training.config import TrainConfig
from openrlaif.training.errors import TrainingError
from openrlaif.training.metrics import truncate_jsonl
from openrlaif.training.trackers import note_logged_steps

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")

KILL_ENV = "OPENRLAIF_KILL_AT_STEP"  # testing aid, see `simulate_kill`


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path  # the final HF model folder
    steps: int
    metrics: dict[str, float]  # the final held-out metrics
    first_metrics: dict[str, float] | None  # held-out metrics before training (None when resumed)
    model: torch.nn.Module  # the trained model (unwrapped), for programmatic use


def prepare_run(
    config: TrainConfig, resume: bool, accelerator: Accelerator
) -> tuple[Path, Checkpoint | None]:
    """Create the output dir, find the checkpoint to resume from, save the resolved config."""
    out = Path(config.output_dir)
    check_trackers(config.report_to)  # a tracker that is not installed stops the run before it starts
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"output_dir {out} already has a checkpoint (step {checkpoint.step}); "
            "pass --resume to continue that run, or choose another output_dir"
        )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config_file = out / "config.yaml"
        current = config.model_dump(mode="json")
        if checkpoint is not None and config_file.exists():
            before = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            if changed:
                print(f"note: resuming with changed settings: {', '.join(changed)}")
        write_text_atomic(config_file, yaml.safe_dump(current, sort_keys=False))
        keep = checkpoint.step if checkpoint else -1
        note_logged_steps(out, out / "metrics.jsonl")  # what W&B / trackio have: not logged twice
        truncate_jsonl(out / "metrics.jsonl", keep)
        for ids_file in out.glob("example_ids.rank*.jsonl"):
            truncate_jsonl(ids_file, keep)
    accelerator.wait_for_everyone()
    return out, checkpoint


def one_writer_per_output_dir(train: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Decorates a trainer: its `output_dir` takes one writer, and a second run on it is refused at
    once (data/lock.py). Under a launcher the main process (RANK 0) holds the lock for the launch;
    if it is refused it exits, and the launcher stops the other processes. When the run is done
    the main process writes the model folder's card (`model/README.md`, training/card.py). The
    run's LM-head logits are projected `logits_chunk_mib` at a time (models/logprobs.py)."""

    @functools.wraps(train)
    def run(config: TrainConfig, *args: Any, **kwargs: Any) -> TrainResult:
        with logits_chunk_mib(config.logits_chunk_mib):
            return locked(config, *args, **kwargs)

    def locked(config: TrainConfig, *args: Any, **kwargs: Any) -> TrainResult:
        if int(os.environ.get("RANK", "0")) != 0:
            return train(config, *args, **kwargs)
        with one_writer(config.output_dir):
            result = train(config, *args, **kwargs)
            write_run_card(config, result.steps, result.metrics, result.first_metrics, result.model_dir)
            return result

    return run


@dataclass
class RunStart:
    """What the supervised trainers (SFT, RM, DPO) have in hand before they load a model."""

    accelerator: Accelerator
    output_dir: Path
    checkpoint: Checkpoint | None  # the one to resume from
    train_set: list[Any]
    held_out: list[Any]
    source: str  # the tokenizer's folder: the checkpoint's when resuming, else `model`'s
    weights: str  # the weights' folder: `source`; with LoRA always `model` (`apply_lora` adds the adapters)


def read_examples(
    source: str,
    limit: int | None,
    from_pair: Callable[[Pair], T],
    parse_row: Callable[[dict[str, Any], int], T],
) -> list[T]:
    """A supervised trainer's examples: a built-in pairs dataset (each pair made an example by
    `from_pair`) or a file (each row parsed by `parse_row`), the first `limit` of them."""
    if source in BUILTIN_DATASETS:
        examples = [from_pair(p) for p in load_pairs(source).records]
    elif Path(source).exists():
        examples = read_records(source, parse_row).records
    else:
        names = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigError(f"data: {source!r} is neither a built-in dataset ({names}) nor an existing file")
    examples = examples[:limit] if limit is not None else examples
    if not examples:
        raise TrainingError(f"{source}: no examples")
    return examples


def start_run(
    config: TrainConfig, resume: bool, load_examples: Callable[[str, int | None], Sequence[Any]]
) -> RunStart:
    """The opening the supervised trainers share: quiet library logs, the accelerator, the run
    folder (and the checkpoint to resume from), the seed, the data and its held-out split."""
    quiet_transformers()
    accelerator = make_accelerator(config)
    output_dir, checkpoint = prepare_run(config, resume, accelerator)
    set_seed(config.seed)
    # The held-out split depends only on the seed, so a resumed run gets the same one.
    examples = load_examples(config.data, config.limit)
    eval_examples = load_examples(config.eval_data, None) if config.eval_data else None
    train_set, held_out = split_held_out(examples, config, eval_examples)
    # from the checkpoint when resuming (the folder holds the tokenizer, and any head, too)
    with accelerator.main_process_first():  # a `tiny:` model is built once
        source = str(checkpoint.model_dir) if checkpoint else resolve_model_path(config.model)
        weights = weights_source(config, checkpoint)
    return RunStart(accelerator, output_dir, checkpoint, train_set, held_out, source, weights)


def weights_source(config: TrainConfig, checkpoint: Checkpoint | None) -> str:
    """Where a trained model's weights load from: the checkpoint's model folder when resuming, else
    `model` (resolved). With LoRA always `model`: a checkpoint holds only the adapters, which
    `apply_lora` loads on top."""
    if checkpoint is not None and config.lora is None:
        return str(checkpoint.model_dir)
    return resolve_model_path(config.model)


def apply_lora(model: Any, config: TrainConfig, checkpoint: Checkpoint | None, task: LoRATask) -> Any:
    """With `lora` set: the model with LoRA adapters (only they train), those of `checkpoint` when
    resuming (bit-identical). Without: the model unchanged."""
    if config.lora is None:
        return model
    model = add_lora(model, config.lora, task)
    if checkpoint is not None:
        load_adapter_weights(model, checkpoint.model_dir)
    return model


def export_merged(config: TrainConfig) -> bool:
    """Whether `output_dir/model` holds the adapters merged into the weights (`lora.export`)."""
    return config.lora is not None and config.lora.export == "merged"


def simulate_kill(step: int) -> None:
    """Testing aid: with `OPENRLAIF_KILL_AT_STEP=k` the process SIGKILLs itself right after the
    optimizer step k, before step k's checkpoint: a crash or a preempted job, no clean-up at all."""
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
