"""Training: SFT, the soft-label reward model, DPO on soft labels, and RL with a KL penalty.

Each trainer is one module (RL: the `rl/` package, one file per algorithm), readable top to
bottom, with its config class beside its train function. The pieces they share are split by
concern: `config` (TrainConfig, loading a YAML config), `accelerator` (hardware, seeding),
`batching` (sharded batches, the held-out split, padding, the step count), `optim` (AdamW, the
schedule), `checkpoint` (save, resume, RNG states), `metrics` (logging, throughput), `run` (the
output folder, the run's opening, TrainResult), `step` (the end of an optimizer step), `losses`
(the soft-label preference losses) and `errors`.

`TRAINERS` maps the CLI name (`openrlaif train NAME`) to its config schema and train function,
for the CLI and for tests that launch any trainer the same way (tests/ddp_worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openrlaif.training.config import ConfigSchema, TrainConfig
from openrlaif.training.dpo import DPOConfig, train_dpo
from openrlaif.training.errors import TrainingError
from openrlaif.training.reward import RewardConfig, RewardModel, train_reward_model
from openrlaif.training.rl import RLConfig, train_rl
from openrlaif.training.run import TrainResult
from openrlaif.training.sft import SFTConfig, train_sft

TRAINERS: dict[str, tuple[ConfigSchema[TrainConfig], Callable[..., TrainResult]]] = {
    "sft": (SFTConfig, train_sft),
    "rm": (RewardConfig, train_reward_model),
    "dpo": (DPOConfig, train_dpo),
    "rl": (RLConfig, train_rl),
}


def run_trainer(name: str, config: Any, resume: bool = False, show_progress: bool = True) -> TrainResult:
    return TRAINERS[name][1](config, resume=resume, show_progress=show_progress)


__all__ = [
    "TRAINERS",
    "DPOConfig",
    "RLConfig",
    "RewardConfig",
    "RewardModel",
    "SFTConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "run_trainer",
    "train_dpo",
    "train_reward_model",
    "train_rl",
    "train_sft",
]
