"""The hardware a run trains on: one `accelerate.Accelerator` (CPU, one or many processes with
gloo, or GPUs), its mixed precision, and the seed of every RNG."""

from __future__ import annotations

import atexit
import functools
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from openrlaif.errors import ConfigError
from openrlaif.models.precision import Precision, choose_precision
from openrlaif.training.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One Accelerator: a single process, `accelerate launch` processes (gloo on CPU), or GPUs."""
    from accelerate import Accelerator  # why: accelerate is slow to import
    from accelerate.state import AcceleratorState, GradientState

    cpu = config.cpu or not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate starts DeepSpeed only on GPUs; on CPU it would silently train plain DDP
        raise ConfigError(
            "the accelerate config asks for DeepSpeed, which accelerate starts only on GPUs; on CPU processes "
            "use configs/accelerate/fsdp2.yaml (sharded like ZeRO-3) or configs/accelerate/ddp.yaml"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several times (a pipeline, tests, a notebook); accelerate keeps its
        # state process-wide and refuses a second mixed-precision setting, so start from scratch.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=training_precision(config).mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
    )
    _fsdp_plugin(accelerator)
    if torch.distributed.is_initialized():
        _leave_process_group_at_exit()
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # DeepSpeed wants the micro-batch size; we do not hand it a DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return accelerator


@functools.cache  # registered once per process, however many trainers it runs
def _leave_process_group_at_exit() -> None:
    """A launched process leaves its process group before the interpreter exits. Left to C++'s
    exit-time destructors, the group's threads can end the process with SIGABRT ("terminate called
    without an active exception") after training finished, failing the launch; seen under FSDP."""

    def leave() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(leave)


def _fsdp_plugin(accelerator: Accelerator) -> None:
    """FSDP from an accelerate config (`distributed_type: FSDP`): a fresh plugin for each trainer,
    and FSDP on CPU processes too.

    accelerate keeps one plugin per process, and preparing a model writes that model's block
    classes into it: a second trainer in the same processes (the pipeline, a test) would shard its
    model with the first one's. And accelerate 1.15 turns FSDP on only for GPU-like process
    groups; on CPU processes (gloo) it silently trains with plain DDP. torch's FSDP2
    (`fully_shard`) runs on CPU with gloo, so FSDP is switched on there; accelerate's FSDP2 code
    (prepare, the full state dict, clipping) then runs as on GPUs. FSDP1 needs GPUs: refused."""
    from accelerate.state import PartialState  # why: accelerate is slow to import
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        return
    plugin = FullyShardedDataParallelPlugin()  # the config's fsdp_* settings, from the launcher's environment
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:  # what accelerate made of FSDP on CPU
        if plugin.fsdp_version != 2:
            raise ConfigError(
                "FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 needs GPUs)"
            )
        # accelerate copies PartialState's fields into AcceleratorState whenever one is made: set both
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def training_precision(config: TrainConfig) -> Precision:
    """The run's mixed precision (bf16 autocast or none; the weights stay float32), chosen as
    everywhere by `models.precision`: `auto` is bf16 where the hardware has native bf16 math."""
    on_gpu = torch.cuda.is_available() and not config.cpu
    return choose_precision(config.mixed_precision, torch.device("cuda" if on_gpu else "cpu"))


def uses_fsdp(accelerator: Accelerator) -> bool:
    """FSDP shards weights, gradients and optimizer state; checkpoints gather them (checkpoint.py)."""
    from accelerate.utils import DistributedType  # why: accelerate is slow to import

    return accelerator.distributed_type == DistributedType.FSDP


def uses_deepspeed(accelerator: Accelerator) -> bool:
    """DeepSpeed's checkpoints go through accelerate's own format (untested: it needs GPUs here)."""
    from accelerate.utils import DistributedType  # why: accelerate is slow to import

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
