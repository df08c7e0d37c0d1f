"""Checkpoints: model, optimizer and scheduler state, RNG states and the data position, as
safetensors + JSON (nothing pickled), written to a temp dir and renamed into place; a full disk
is one line naming the checkpoint, and the previous one stays the newest. `--resume` continues
from the newest complete one exactly."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from openrlaif.data.io import disk_full_error
from openrlaif.errors import DiskFullError
from openrlaif.models.lora import has_lora, save_adapter_folder, save_merged_folder
from openrlaif.training.accelerator import uses_deepspeed, uses_fsdp
from openrlaif.training.batching import ShardedBatches
from openrlaif.training.errors import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"


def _encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as JSON: dropout and sampling resume exactly."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    np_kind, np_keys, *np_rest = cast(tuple[Any, ...], np_state)  # the legacy tuple form
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            np_kind,
            np_keys.tolist(),
            *[v.item() if hasattr(v, "item") else v for v in np_rest],
        ],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in state["cuda"]])


# Nested optimizer/scheduler state as JSON with every tensor moved to a safetensors file. Dicts are
# stored as key/value lists so integer keys (the optimizer's parameter indices) stay integers.


def _to_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _to_tree(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_to_tree(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} (at {path}) in a checkpoint")


def _from_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_from_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_from_tree(v, tensors) for v in obj["__tuple__"])
        return {k: _from_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state_files(state: dict[str, Any], directory: Path, name: str) -> None:
    """`name.json` (+ `name.safetensors` when the state holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _to_tree(state, name, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(tree), encoding="utf-8")


def load_state_files(directory: Path, name: str) -> dict[str, Any]:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _from_tree(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint (temp dirs of a save that was cut short are ignored)."""
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("step-*"):
        state_file = path / "trainer_state.json"
        if path.is_dir() and state_file.exists():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            found.append(Checkpoint(path, int(state["step"]), state))
    return max(found, key=lambda c: c.step) if found else None


def save_model_folder(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path,
    merged: bool = False,
) -> None:  # fmt: skip
    """An HF model folder (config + safetensors + tokenizer). Collective: every process calls it
    (a sharded engine gathers the weights); the main process writes. A model with LoRA adapters
    gives peft's adapter folder (checkpoints: exact), or with `merged` the adapters merged into a
    copy of its weights (a plain folder; the model keeps training with its adapters)."""
    state_dict = accelerator.get_state_dict(model)  # under FSDP gathered whole, on the main process
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with disk_full_error(directory):
            if not has_lora(unwrapped):
                unwrapped.save_pretrained(directory, state_dict=state_dict)
            elif merged:
                save_merged_folder(unwrapped, directory)
            else:
                save_adapter_folder(unwrapped, directory, state_dict)
            tokenizer.save_pretrained(directory)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ShardedBatches,
    keep: int,
    extra: dict[str, Any] | None = None,
    extra_models: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write checkpoint `step-N` atomically: everything goes into a temp dir that is renamed into
    place last, so a run killed mid-save, or one that fills the disk, leaves the previous checkpoint
    as the newest one.
    `extra_models` (e.g. RL's value model) are saved as model folders `step-N/<name>`."""
    root = output_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    try:
        with disk_full_error(final):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            if uses_deepspeed(accelerator):  # accelerate's own format (untested: it needs GPUs, README)
                accelerator.save_state(str(tmp / "accelerate"))
            save_model_folder(accelerator, model, tokenizer, tmp / "model")
            for name, extra_model in (extra_models or {}).items():
                save_model_folder(accelerator, extra_model, tokenizer, tmp / name)
            trained = [model, *(extra_models or {}).values()]
            optimizer_state = (
                None if uses_deepspeed(accelerator) else full_optimizer_state(accelerator, trained, optimizer)
            )
            if accelerator.is_main_process:
                if optimizer_state is not None:
                    save_state_files(optimizer_state, tmp, "optimizer")
                save_state_files(scheduler.state_dict(), tmp, "scheduler")
            # every process has its own RNG streams (and so its own dropout masks)
            (tmp / f"rng.rank{accelerator.process_index}.json").write_text(
                json.dumps(rng_state()), encoding="utf-8"
            )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {
                    "step": step,
                    "data": loader.state_dict(),
                    "world_size": accelerator.num_processes,
                    **(extra or {}),
                }
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    except DiskFullError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the space back; the previous checkpoint stays the newest
        raise DiskFullError(str(final)) from None
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a finished run resumed): swap, then delete
            old = root / f".step-{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".step-*.tmp"):  # from saves that were killed
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    checkpoint: Checkpoint,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ShardedBatches,
    models: Sequence[torch.nn.Module],
) -> int:
    """Restore optimizer, scheduler, data position and RNG states (the weights were loaded from
    `checkpoint.model_dir` when the model was built; `models` are those the optimizer trains, as
    prepared). Returns the step to continue after."""
    world = int(checkpoint.state.get("world_size", 1))
    if world != accelerator.num_processes:
        raise TrainingError(
            f"{checkpoint.path} was written by {world} process(es); resume it with {world} "
            f"(got {accelerator.num_processes}), or start a new output_dir"
        )
    if uses_deepspeed(accelerator):
        accelerator.load_state(str(checkpoint.path / "accelerate"))
    else:
        load_full_optimizer_state(
            accelerator, models, optimizer, load_state_files(checkpoint.path, "optimizer")
        )
    scheduler.load_state_dict(load_state_files(checkpoint.path, "scheduler"))
    loader.load_state_dict(checkpoint.state["data"])
    rng_file = checkpoint.path / f"rng.rank{accelerator.process_index}.json"
    set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return checkpoint.step


def full_optimizer_state(
    accelerator: Accelerator, models: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """The optimizer's whole state, on the main process (None on the others). One process or DDP:
    every process holds all of it. FSDP: each holds a shard; torch gathers them (a collective) into
    one state keyed by parameter name, the same file a resume under FSDP reads back."""
    if not uses_fsdp(accelerator):
        return optimizer.state_dict() if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(
        _one_module(models), _inner(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # fmt: skip
    return state if accelerator.is_main_process else None


def load_full_optimizer_state(
    accelerator: Accelerator, models: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:  # fmt: skip
    """`full_optimizer_state` back into the optimizer; under FSDP each process keeps its shard."""
    if not uses_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        _one_module(models), _inner(optimizer), state, options=StateDictOptions(full_state_dict=True)
    )  # fmt: skip


def _one_module(models: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """The models an optimizer trains as one module (torch's helpers name parameters from one)."""
    return models[0] if len(models) == 1 else torch.nn.ModuleList(models)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (torch's state-dict helpers want that one)."""
    return getattr(optimizer, "optimizer", optimizer)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order: equal digests = bitwise equal weights.
    A model sharded by FSDP is gathered tensor by tensor (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
