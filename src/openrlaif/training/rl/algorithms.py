"""The RL algorithms by name, and `RLConfig`: the config of the algorithm a mapping names.

`ALGORITHMS` maps each `algorithm:` name to its config class and its update, both in the
algorithm's own file. `RLConfig` validates settings into that algorithm's config (a tagged union
on `algorithm`, `reinforce` when absent): a setting of another algorithm (PPO's `gamma` under
`reinforce`) is a one-line error naming the setting and the algorithms, and an unknown name is
an error listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from openrlaif.training.rl import grpo, online_dpo, ppo, reinforce, rloo
from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.rollout import Rollout
from openrlaif.training.rl.updater import Updater

DEFAULT_ALGORITHM = "reinforce"  # the paper's; configs without `algorithm` get it


@dataclass(frozen=True)
class RLAlgorithm:
    """An algorithm: its config class (whose `algorithm` default is its name) and its update,
    `update(config, updater, rollout) -> logged losses` (one RL step's optimizer steps)."""

    config: type[RLBaseConfig]
    update: Callable[[Any, Updater, Rollout], dict[str, torch.Tensor]]

    @property
    def name(self) -> str:
        return str(self.config.model_fields["algorithm"].default)


ALGORITHMS: dict[str, RLAlgorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        RLAlgorithm(reinforce.ReinforceConfig, reinforce.update),
        RLAlgorithm(rloo.RLOOConfig, rloo.update),
        RLAlgorithm(ppo.PPOConfig, ppo.update),
        RLAlgorithm(online_dpo.OnlineDPOConfig, online_dpo.update),
        RLAlgorithm(grpo.GRPOConfig, grpo.update),
    )
}


def _invalid(loc: str, value: Any, error: PydanticCustomError) -> ValidationError:
    details: list[InitErrorDetails] = [{"type": error, "loc": (loc,), "input": value}]
    return ValidationError.from_exception_data("RLConfig", details)


class RLConfigSchema:
    """`RLConfig(**settings)` and `RLConfig.model_validate(settings)`: the settings validated into
    the config of the algorithm they name (`ReinforceConfig`, `PPOConfig`, ...). Errors are
    pydantic `ValidationError`s, as a config class's are, each naming the setting."""

    def __call__(self, **settings: Any) -> RLBaseConfig:
        return self.model_validate(settings)

    def model_validate(self, obj: Any, /) -> RLBaseConfig:
        if not isinstance(obj, dict):  # pydantic's own error for a non-mapping
            return ALGORITHMS[DEFAULT_ALGORITHM].config.model_validate(obj)
        name = obj.get("algorithm", DEFAULT_ALGORITHM)
        if name not in ALGORITHMS:
            *names, last = [repr(n) for n in ALGORITHMS]
            known = f"{', '.join(names)} or {last}" if names else last
            raise _invalid("algorithm", name, PydanticCustomError(
                "unknown_algorithm", "Input should be {known}", {"known": known}
            ))  # fmt: skip
        config = ALGORITHMS[name].config
        for key in obj:
            owners = [n for n, a in ALGORITHMS.items() if key in a.config.model_fields]
            if key not in config.model_fields and owners:
                whose = f"algorithm {owners[0]}" if len(owners) == 1 else f"algorithms {' and '.join(owners)}"
                raise _invalid(key, obj[key], PydanticCustomError(
                    "other_algorithm", "a setting of {whose}; algorithm {name} does not use it",
                    {"whose": whose, "name": name},
                ))  # fmt: skip
        return config.model_validate(obj)


RLConfig = RLConfigSchema()
