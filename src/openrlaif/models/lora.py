"""LoRA adapters through `peft`: the one home for adding them, switching them off and saving them.

- `add_lora`: low-rank adapters on a loaded model (`task`: "causal_lm" for a policy,
  "sequence_classification" for a reward model, whose score head is trained in full through
  `modules_to_save`, or "value_head" for a `ValueHeadModel`, whose body gets the adapters and whose
  head stays trainable); the base weights are frozen.
- `lora_model`: the `PeftModel` inside a (possibly DDP/accelerate-wrapped) model, or None.
- `adapters_disabled`: a context in which the model computes as its base model (the DPO/RL
  reference: the same weights with the adapters off, no second copy).
- `save_adapter_folder` / `load_adapter_weights`: the adapters (plus any trainable head) as
  peft's folder (`adapter_config.json` + `adapter_model.safetensors`, `base_model_name_or_path`
  the resolved base), and back into a model built by `add_lora` (exact: the same tensors).
- `attach_adapter_folder`: an adapter folder's adapters on their base model, kept apart (a reward
  model; `models/loading` merges them in wherever a folder is taken as a model).
- `save_merged_folder`: the adapters merged into a deep copy of the model (training goes on with
  the adapters), saved as a plain transformers folder.

torch and peft are imported inside the functions: `openrlaif` commands that never train stay light.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from openrlaif.models.loading import ADAPTER_CONFIG

if TYPE_CHECKING:
    import torch

LoRATask = Literal["causal_lm", "sequence_classification", "value_head"]


class LoRAOptions(Protocol):
    """The adapters' settings (`training.config.LoRASettings` has them)."""

    @property
    def r(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def target_modules(self) -> list[str] | str: ...


def add_lora(model: Any, settings: LoRAOptions, task: LoRATask) -> Any:
    """`model` with LoRA adapters of rank `r` (scale alpha / r) on `target_modules` ("all-linear":
    every linear layer but the output head); only the adapters (and a reward model's head) train.
    Returns the `PeftModel`, or for "value_head" the same `ValueHeadModel` with its body wrapped."""
    from peft import LoraConfig, TaskType, get_peft_model  # why: peft imports torch and transformers

    target = settings.target_modules
    peft_task = {"causal_lm": TaskType.CAUSAL_LM, "sequence_classification": TaskType.SEQ_CLS}.get(task)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,  # type: ignore[arg-type]
        target_modules=target if isinstance(target, str) else list(target), task_type=peft_task,
    )  # fmt: skip
    with warnings.catch_warnings():
        # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, and says so; transformers' renamed
        # `is_gradient_checkpointing`, which peft still reads
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if task == "value_head":  # the body is a transformers model; the head (a plain Linear) trains in full
            model.body = get_peft_model(model.body, config)
            model.value_head.requires_grad_(True)
            return model
        # SEQ_CLS puts the score head in `modules_to_save`: a trained copy, the original kept frozen
        return get_peft_model(model, config)


def _unwrap(model: Any) -> Any:
    """The model inside DDP / accelerate's wrappers (each holds it as `.module`)."""
    while not _is_peft(model) and hasattr(model, "module"):
        model = model.module
    return model


def _is_peft(model: Any) -> bool:
    from peft import PeftModel  # why: peft imports torch and transformers

    return isinstance(model, PeftModel)


def lora_model(model: Any) -> Any:
    """The `PeftModel` of a model made by `add_lora` (through DDP wrappers, or a value-head model's
    body), or None for a model without adapters."""
    inner = _unwrap(model)
    if _is_peft(inner):
        return inner
    body = getattr(inner, "body", None)
    return body if body is not None and _is_peft(body) else None


def has_lora(model: Any) -> bool:
    return lora_model(model) is not None


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Within: the model computes exactly as its base model (the adapters, and any trained copy of a
    head, bypassed). A model without adapters is an error: it would be its own reference."""
    peft = lora_model(model)
    if peft is None:
        raise ValueError("adapters_disabled: the model has no LoRA adapters")
    with peft.disable_adapter():
        yield


def base_model_path(model: Any) -> str | None:
    """The folder or hub id the adapters' base model was loaded from."""
    peft = lora_model(model)
    if peft is None:
        return None
    return getattr(peft.peft_config[peft.active_adapter], "base_model_name_or_path", None)


def _fix_base_path(directory: Path, base_path: str | None) -> None:
    """peft records `model.name_or_path`; write the resolved base so the folder loads anywhere here."""
    config_file = directory / ADAPTER_CONFIG
    if base_path is None or not config_file.exists():
        return
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_path
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter_folder(
    model: Any,
    directory: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_path: str | None = None,
) -> None:
    """peft's adapter folder (`adapter_config.json`, `adapter_model.safetensors`; for a value-head
    model also `value_head.safetensors`), loadable with `PeftModel.from_pretrained(base, directory)`
    or `peft.AutoPeftModelFor...`. `state_dict`: the whole model's (as accelerate gathers it)."""
    inner = _unwrap(model)
    base_path = base_path or base_model_path(inner)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_peft(inner):
        inner.save_pretrained(str(directory), state_dict=state_dict, save_embedding_layers=False)
    else:  # ValueHeadModel with a peft body
        from safetensors.torch import save_file  # why: as peft

        from openrlaif.models.heads import VALUE_HEAD_FILE  # why: heads imports torch at module level

        state_dict = inner.state_dict() if state_dict is None else state_dict
        body = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
        inner.body.save_pretrained(str(directory), state_dict=body, save_embedding_layers=False)
        head = {k.removeprefix("value_head."): v.contiguous() for k, v in state_dict.items()
                if k.startswith("value_head.")}  # fmt: skip
        save_file(head, str(directory / VALUE_HEAD_FILE))
    _fix_base_path(directory, base_path)


def load_adapter_weights(model: Any, directory: Path) -> None:
    """The adapters (and head) `save_adapter_folder` wrote, into a model that `add_lora` made with
    the same settings: bit-identical tensors, for an exact resume."""
    from peft import set_peft_model_state_dict  # why: peft imports torch and transformers
    from safetensors.torch import load_file  # why: as peft

    inner = _unwrap(model)
    peft = lora_model(inner)
    assert peft is not None, "load_adapter_weights: the model has no LoRA adapters"
    result = set_peft_model_state_dict(peft, load_file(str(directory / "adapter_model.safetensors")))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise ValueError(f"{directory}: adapter weights that the model lacks: {unexpected[:3]}")
    if peft is not inner:  # a value-head model: its head too
        from openrlaif.models.heads import VALUE_HEAD_FILE  # why: heads imports torch at module level

        inner.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))


def attach_adapter_folder(model: Any, directory: str | Path, task: LoRATask) -> Any:
    """The adapters of an adapter folder on their base `model`, for inference (peft's
    `PeftModel.from_pretrained`; for a value-head model its body, and its head loaded)."""
    from peft import PeftModel  # why: peft imports torch and transformers

    if task != "value_head":
        return PeftModel.from_pretrained(model, str(directory))
    from safetensors.torch import load_file  # why: as peft

    from openrlaif.models.heads import VALUE_HEAD_FILE  # why: heads imports torch at module level

    model.body = PeftModel.from_pretrained(model.body, str(directory))
    model.value_head.load_state_dict(load_file(str(Path(directory) / VALUE_HEAD_FILE)))
    return model


def merged_copy(model: Any) -> Any:
    """A deep copy of the model with the adapters merged into its weights: a plain transformers
    model (or a `ValueHeadModel` with a plain body). The model itself keeps its adapters."""
    inner = _unwrap(model)
    clone = copy.deepcopy(inner)
    if _is_peft(clone):
        return clone.merge_and_unload()
    clone.body = clone.body.merge_and_unload()
    return clone


def save_merged_folder(model: Any, directory: Path) -> None:
    """The adapters merged into a copy of the model, saved as a plain folder that
    `AutoModelFor...from_pretrained` (or `ValueHeadModel.from_pretrained`) loads."""
    merged = merged_copy(model)
    merged.save_pretrained(str(directory))
