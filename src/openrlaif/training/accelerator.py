"""The hardware a run trains on: one `accelerate.Accelerator` (CPU, one or many processes with
gloo, or GPUs), its mixed precision, and the seed of every RNG."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from openrlaif.training.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One Accelerator: a single process, `accelerate launch` processes (gloo on CPU), or GPUs."""
    from accelerate import Accelerator  # why: accelerate is slow to import
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several times (a pipeline, tests, a notebook); accelerate keeps its
        # state process-wide and refuses a second mixed-precision setting, so start from scratch.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    accelerator = Accelerator(
        cpu=config.cpu or not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(config),
        gradient_accumulation_steps=config.grad_accum_steps,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # DeepSpeed wants the micro-batch size; we do not hand it a DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return accelerator


def resolve_mixed_precision(config: TrainConfig) -> str:
    """`auto` -> "bf16" where the hardware has native bf16 math, else "no"."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available() and not config.cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return "bf16" if any(native) else "no"


def uses_sharded_engine(accelerator: Accelerator) -> bool:
    """DeepSpeed and FSDP shard weights/optimizer state; their checkpoints go through accelerate."""
    from accelerate.utils import DistributedType  # why: accelerate is slow to import

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
