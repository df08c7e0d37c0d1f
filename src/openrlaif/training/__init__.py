"""Training: supervised fine-tuning and the soft-label reward model (DPO and RL build on `common`).

Each algorithm is one module, readable top to bottom, with its config class beside its train
function. `TRAINERS` maps the CLI name (`openrlaif train NAME`) to both, for the CLI and for
tests that launch any trainer the same way (tests/ddp_worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openrlaif.training.common import TrainConfig, TrainingError, TrainResult
from openrlaif.training.reward import RewardConfig, RewardModel, train_reward_model
from openrlaif.training.sft import SFTConfig, train_sft

TRAINERS: dict[str, tuple[type[TrainConfig], Callable[..., TrainResult]]] = {
    "sft": (SFTConfig, train_sft),
    "rm": (RewardConfig, train_reward_model),
}


def run_trainer(name: str, config: Any, resume: bool = False, show_progress: bool = True) -> TrainResult:
    return TRAINERS[name][1](config, resume=resume, show_progress=show_progress)


__all__ = [
    "TRAINERS",
    "RewardConfig",
    "RewardModel",
    "SFTConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "run_trainer",
    "train_reward_model",
    "train_sft",
]
