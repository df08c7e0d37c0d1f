"""`TrainConfig`, the settings every trainer shares, and loading a trainer's YAML config.

Each trainer subclasses `TrainConfig` beside its loop (SFTConfig in sft.py, ...); unknown keys
are errors. `load_train_config` reads a YAML file with optional `--set KEY=VALUE` overrides into
any config schema (a TrainConfig subclass, or RL's `RLConfig`, which picks the algorithm's config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from openrlaif.config import (
    StrictModel,
    Tracker,
    apply_overrides,
    format_validation_error,
    parse_set_overrides,
    read_yaml,
    resolve_shipped_yaml,
)
from openrlaif.errors import ConfigError
from openrlaif.models.logprobs import DEFAULT_CHUNK_MIB


class LoRASettings(StrictModel):
    """LoRA adapters through `peft` (`lora:` in any trainer): the base weights stay frozen and only
    low-rank updates of `target_modules` train (scale alpha / r). The DPO/RL reference is the same
    model with the adapters off: no second copy is held."""

    r: int = Field(8, ge=1)  # the adapters' rank
    alpha: float = Field(16.0, gt=0.0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the adapters' input
    # module names (suffixes such as q_proj, c_attn) or every linear layer but the output head
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # what `<output_dir>/model/` holds: the adapters merged into the weights (a plain transformers
    # folder), or the adapters alone (peft's folder; its adapter_config.json names the base model)
    export: Literal["merged", "adapter"] = "merged"

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError('name at least one module, or "all-linear"')
        return value


class TrainConfig(StrictModel):
    """Settings every trainer shares. Trainers subclass it (SFTConfig, RewardConfig, ...)."""

    # the training method, as model cards and trackers name it (sft, reward-model, dpo, rl)
    method: ClassVar[str] = "training"

    # model and data
    model: str  # HF model id or local folder; `tiny:gpt2` / `tiny:llama` = offline random test models
    revision: str | None = None
    trust_remote_code: bool = False  # never run a model repo's code unless asked for
    data: str  # a file (.jsonl/.jsonl.gz/.parquet) or a built-in dataset name
    eval_data: str | None = None  # held-out file; without it, `eval_fraction` of `data` is held out
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_eval_examples: int | None = Field(512, ge=1)  # cap on the held-out set (eval cost)
    limit: int | None = Field(None, ge=1)  # use only the first N examples of `data`
    max_length: int = Field(512, ge=8)  # tokens; prompts are cut from the left, completions from the right
    # Batches are padded to the longest sequence rounded up to a multiple of this. 1: no rounding.
    # On CPU, every new batch shape leaves the allocator and oneDNN's kernel cache holding more
    # memory; 64 keeps the shapes few (the quickstart's RM stage: 2.2 instead of 4.0 GiB peak RSS)
    # for ~10% more compute. On GPUs, 8 or 64 also suits the tensor cores.
    pad_to_multiple_of: int = Field(1, ge=1)
    output_dir: str

    # optimisation
    seed: int = 0
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides `epochs` when set
    batch_size: int = Field(8, ge=1)  # examples per process per micro-step
    grad_accum_steps: int = Field(1, ge=1)  # micro-steps per optimizer step
    eval_batch_size: int | None = Field(None, ge=1)  # default: batch_size
    learning_rate: float = Field(1e-5, gt=0.0)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup, decay to 0 (or stay)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)  # fraction of the steps with a linear warmup
    weight_decay: float = Field(0.0, ge=0.0)  # AdamW; applied to matrices only, not biases/norms
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)  # None: no clipping (the norm is still logged)
    # bf16 autocast with fp32 weights and optimizer state. "auto": bf16 where the hardware runs it
    # natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, where it measured 1.5-2x faster)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    cpu: bool = False  # train on CPU even when a GPU is present (always CPU when none is)
    # The LM head's logits are projected at most this many MiB (float32) at a time and recomputed
    # in the backward pass, so a large vocabulary's positions x vocabulary logits are never whole
    # (models/logprobs.py). null: all at once.
    logits_chunk_mib: float | None = Field(DEFAULT_CHUNK_MIB, gt=0.0)
    lora: LoRASettings | None = None  # LoRA adapters instead of full fine-tuning (None: every weight trains)

    # bookkeeping
    log_every: int = Field(1, ge=1)  # steps between metric rows (JSONL, TensorBoard)
    eval_every: int = Field(100, ge=0)  # steps between held-out evaluations; 0 = only before and after
    save_every: int = Field(100, ge=1)  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = Field(2, ge=1)  # older checkpoints are deleted
    record_example_ids: bool = False  # write the ids each process trained on, per step

    # experiment trackers: `metrics.jsonl` is always written; each tracker named here gets the same
    # rows, from the main process (training/trackers.py). wandb and trackio: `pip install
    # 'openrlaif[trackers]'`. `tensorboard: false` (the older switch) takes tensorboard out of it.
    report_to: list[Tracker] = Field(default_factory=lambda: list[Tracker](["tensorboard"]))
    run_name: str | None = None  # the W&B / trackio run's name; default: output_dir's folder name
    tracker_project: str = "openrlaif"  # the W&B / trackio project
    tracker_group: str | None = None  # the W&B / trackio group (the pipeline: its run folder's name)

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_switch(cls, data: Any) -> Any:
        """`report_to: wandb` is `[wandb]`, `none` is `[]`; `tensorboard: true|false` (the setting
        `report_to` replaced) adds tensorboard to or takes it out of `report_to`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        trackers = data.get("report_to", ["tensorboard"])
        if isinstance(trackers, str):
            trackers = [] if trackers.lower() == "none" else [trackers]
        if trackers is None:
            trackers = []
        if "tensorboard" in data:
            switch = data.pop("tensorboard")
            if not isinstance(switch, bool):
                raise ValueError("tensorboard: expected true or false (or list the trackers in report_to)")
            trackers = [t for t in trackers if t != "tensorboard"] + (["tensorboard"] if switch else [])
        data["report_to"] = list(dict.fromkeys(trackers)) if isinstance(trackers, list) else trackers
        return data

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


C = TypeVar("C", bound=TrainConfig, covariant=True)


class ConfigSchema(Protocol[C]):
    """What validates a trainer's settings: a TrainConfig subclass, or RL's `RLConfig`."""

    def model_validate(self, obj: Any, /) -> C: ...


PACKAGED_TRAIN_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


def resolve_train_config_path(name_or_path: str) -> Path:
    """A config file, or a shipped one by name (`sft-tiny` = configs/train/sft-tiny.yaml)."""
    return resolve_shipped_yaml(name_or_path, PACKAGED_TRAIN_DIR, "training config")


def load_train_config(path: str | Path, model: ConfigSchema[C], overrides: Sequence[str] = ()) -> C:
    """A YAML config, optionally with `--set` items (`a.b=VALUE`, VALUE read as YAML; the one
    parser, `config.parse_set_overrides`), validated with a one-line error naming the file and the
    setting."""
    data = read_yaml(Path(path))
    data = {} if data is None else data
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        apply_overrides(data, parse_set_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        source = f"{path} (with --set)" if overrides else str(Path(path))
        raise ConfigError(format_validation_error(source, e)) from None
