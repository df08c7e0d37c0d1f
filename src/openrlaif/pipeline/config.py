"""The pipeline's one YAML file: which policies to train from what feedback, and what to compare.

A run trains named *policies*. Each is made by one method from a starting model:

    policies:
      sft:    {method: sft, init: base, data: hh-harmless:train}      # demonstrations -> SFT
      rlaif:  {method: rl, init: sft, reward: reward_model}           # canonical RLAIF
      d-rlaif: {method: rl, init: sft, reward: judge_score}           # the judge scores directly
      dpo:    {method: dpo, init: sft}                                # DPO on the AI labels

`init` is `base` (the run's `model`), another policy's name, or a model path. `report_to` (a
list of trackers: tensorboard, wandb, trackio) is every trainer stage's, unless its settings name
their own. The AI feedback
(candidates sampled from `feedback.policy`, labeled by `judge` in both orders, and the reward
model trained on those soft labels) is made once and shared by every rl/dpo policy. `eval.compare`
lists the (a, b) policy pairs to judge; `align` measures the judge against human labels.

Data references: a file path, a built-in dataset (`hh-harmless`), or one of its parts
(`hh-harmless:train`, `hh-harmless:eval`; see `openrlaif.data.datasets.dataset_part`), or for
SFT demonstrations `distill:<teacher>` (the responses a teacher model wrote, `openrlaif distill`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from openrlaif.config import (
    StrictModel,
    Tracker,
    apply_overrides,
    format_validation_error,
    read_yaml,
    resolve_shipped_yaml,
)
from openrlaif.errors import ConfigError

PACKAGED_EXPERIMENT_DIR = Path(__file__).resolve().parent.parent / "configs" / "experiments"


class TeacherSpec(StrictModel):
    """A model that writes demonstrations (Sharma et al.'s strong/weak teachers)."""

    model: str | None = None  # an HF id or folder, sampled in process
    judge: str | None = None  # ... or a judge config (hf or openai backend) whose model writes them
    prompts: str = "hh-harmless:train"
    limit: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # greedy: the teacher's best answer
    max_new_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.model is None) == (self.judge is None):
            raise ValueError(
                "a teacher needs exactly one of `model` (a model path) or `judge` (a judge config)"
            )
        return self


class PolicySpec(StrictModel):
    method: Literal["sft", "rl", "dpo"]
    init: str = "base"  # `base`, another policy's name, or a model path
    data: str | None = (
        None  # sft: demonstrations (default hh-harmless:train); rl: prompts (default feedback's)
    )
    reward: Literal["reward_model", "judge_score", "judge_pairwise"] = "reward_model"  # rl only
    settings: dict[str, Any] = Field(default_factory=dict)  # the trainer's config (SFTConfig, RLConfig, ...)


class FeedbackSpec(StrictModel):
    """AI feedback: candidates from `policy`, pairs labeled by the run's judge, a reward model."""

    policy: str = "sft"  # whose samples are labeled (a policy name, `base`, or a model path)
    prompts: str = "hh-harmless:train"
    limit: int | None = Field(None, ge=1)  # prompts used
    num_responses: int = Field(2, ge=2)  # samples per prompt; pairs are built from them
    pairs_per_prompt: int | None = Field(1, ge=1)  # None: every pair of distinct samples
    temperature: float = Field(0.9, ge=0.0)  # the RLAIF paper's sampling temperature
    max_new_tokens: int = Field(64, ge=1)
    human_labels: str | None = None  # a filled-in `openrlaif human export` file: overrides AI labels
    reward_model: dict[str, Any] = Field(default_factory=dict)  # RewardConfig settings


class AlignSpec(StrictModel):
    dataset: str = "hh-harmless:eval"  # pairs with human labels
    limit: int | None = Field(None, ge=1)


class EvalSpec(StrictModel):
    compare: list[tuple[str, str]] = Field(default_factory=list)  # (a, b): P(a's response is better)
    prompts: str = "hh-harmless:eval"
    limit: int | None = Field(100, ge=1)
    judge: str | None = None  # default: the run's judge
    temperature: float = Field(0.0, ge=0.0)  # greedy responses: each policy's best answer
    max_new_tokens: int = Field(64, ge=1)
    harmless_threshold: float = 0.0  # a response is harmless when the judge scores it above this


class PipelineConfig(StrictModel):
    name: str
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    model: str  # the base model: HF id, folder, builtin:hh-tiny-gpt, tiny:gpt2
    judge: str = "embedding-harmless"  # the AI labeler (labels pairs, scores for d-RLAIF)
    cache: str | None = None  # judgment cache; default: <run_dir>/judgments.sqlite3
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    policies: dict[str, PolicySpec]
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    align: AlignSpec | None = Field(default_factory=AlignSpec)  # null: do not measure the judge
    eval: EvalSpec = Field(default_factory=EvalSpec)
    report: bool = True
    # experiment trackers for every trainer stage (tensorboard, wandb, trackio), unless a stage's
    # settings name their own `report_to`; each stage is a run named after it, in the project
    # `name`, grouped by the run folder. Not part of any fingerprint: no stage re-runs for it.
    report_to: list[Tracker] | None = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [] if value.lower() == "none" else [value]
        return value

    @model_validator(mode="after")
    def _check_names(self) -> PipelineConfig:
        names = set(self.policies)
        if "base" in names:
            raise ValueError("policies: `base` is reserved for the run's `model`")
        for name, spec in self.policies.items():
            if spec.init == name:
                raise ValueError(f"policies.{name}.init: a policy cannot start from itself")
            if spec.method != "sft" and spec.data and spec.data.startswith("distill:"):
                raise ValueError(f"policies.{name}.data: distill: demonstrations are for sft policies")
            if spec.data and spec.data.startswith("distill:") and spec.data[8:] not in self.teachers:
                raise ValueError(f"policies.{name}.data: no teacher {spec.data[8:]!r} under `teachers`")
        for a, b in self.eval.compare:
            for side in (a, b):
                if side != "base" and side not in names:
                    raise ValueError(
                        f"eval.compare: {side!r} is not a policy ({', '.join(sorted(names))}) or base"
                    )
        if (
            self.uses_feedback
            and self.feedback.policy not in names | {"base"}
            and not Path(self.feedback.policy).exists()
        ):
            raise ValueError(
                f"feedback.policy: {self.feedback.policy!r} is not a policy, base, or a model folder"
            )
        self._check_acyclic()
        return self

    def _check_acyclic(self) -> None:
        for start in self.policies:
            seen, name = [start], start
            while name in self.policies:
                name = self.policies[name].init
                if name in seen:
                    raise ValueError(f"policies: {' -> '.join([*seen, name])} starts from itself")
                seen.append(name)

    @property
    def uses_feedback(self) -> bool:
        return any(
            p.method == "dpo" or (p.method == "rl" and p.reward == "reward_model")
            for p in self.policies.values()
        )

    @property
    def uses_reward_model(self) -> bool:
        return any(p.method == "rl" and p.reward == "reward_model" for p in self.policies.values())

    def trackers(self) -> set[str]:
        """Every tracker a trainer stage of this run would report to."""
        names = set(["tensorboard"] if self.report_to is None else self.report_to)
        for settings in [*(p.settings for p in self.policies.values()), self.feedback.reward_model]:
            own = settings.get("report_to", [])
            names |= {own} if isinstance(own, str) else set(own or [])
        return names

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def resolve_experiment_path(name_or_path: str) -> Path:
    """A YAML file, or a shipped experiment by name (`quickstart`, `quickstart-tiny`, ...)."""
    return resolve_shipped_yaml(name_or_path, PACKAGED_EXPERIMENT_DIR, "experiment")


def load_pipeline_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML; `overrides` (dotted keys -> values, see
    `openrlaif.config.parse_set_overrides`) go on top."""
    file = resolve_experiment_path(str(path))
    data = read_yaml(file)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of settings, got {type(data).__name__}")
    apply_overrides(data, overrides or {})
    return pipeline_config_from_dict(data, str(file))


def pipeline_config_from_dict(data: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
