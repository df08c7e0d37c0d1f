"""Loading models and tokenizers: the one home for every part of openrlaif that loads one (the
trainers, the HF judge, `openrlaif generate`, the pipeline).

Any Hugging Face path or hub id, with `revision` and `trust_remote_code` (off unless asked for)
always passed on; names such as `tiny:gpt2` or `builtin:...` are resolved first
(`models/names.py`). A model that cannot be loaded is a one-line ConfigError naming it.

- `load_tokenizer`, `load_pretrained`: for training (right padding, pad = eos when missing;
  float32 weights, mixed precision autocasts).
- `load_causal_lm`, `resolve_device`: for inference (eval mode, on a device, in a dtype that
  `models/precision.py` chose), as the judge and `generate` use them.
- `load_model_config`: a model's config alone (its positions, its architecture).
- `quiet_transformers`: transformers' loading reports and weight bars off (we print our own progress).

A folder of LoRA adapters alone (a trainer's `lora.export: adapter`; peft's format, whose
`adapter_config.json` names the base model) loads as its base model with the adapters merged in,
so any stage can start from it; `RewardModel.from_pretrained` keeps a reward model's apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openrlaif.errors import ConfigError
from openrlaif.models.names import resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder (models/lora.py writes them)


def quiet_transformers() -> None:
    """Training prints its own progress; loading reports and weight-loading bars would drown it."""
    from transformers.utils import logging as hf_logging  # why: transformers is slow to import

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_error(path: str, e: Exception) -> ConfigError:
    return ConfigError(f"model: cannot load {path!r} ({first_line(e)})")


def load_tokenizer(
    path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded; pad = eos when the tokenizer has no pad token."""
    from transformers import AutoTokenizer  # why: transformers is slow to import

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model: the tokenizer of {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_pretrained(
    auto_class: Any, path: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """`auto_class.from_pretrained` in float32 (mixed precision autocasts; the weights stay fp32)."""
    import torch  # why: `openrlaif generate` against a server never needs torch; keep its start-up light

    try:
        return _from_pretrained(
            auto_class,
            path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None


def adapter_base(directory: str | Path) -> str | None:
    """The base model an adapter folder (`save_adapter_folder`, peft's format) applies to; None
    for a folder that is not one."""
    config_file = Path(directory) / ADAPTER_CONFIG
    if not config_file.exists():
        return None
    return str(json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"])


def merge_adapter_folder(model: Any, directory: str | Path) -> Any:
    """The adapters of an adapter folder merged into their base `model`: a plain transformers
    model, as if the run had exported `merged` (a later stage starts from it)."""
    from peft import PeftModel  # why: peft imports torch and transformers

    merged = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    # peft records the model's name_or_path as a new adapter's base: it is this folder now
    merged.name_or_path = merged.config._name_or_path = str(directory)
    return merged


def _from_pretrained(auto_class: Any, path: str, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(path)`; an adapter folder: its base (itself perhaps an adapter
    folder) with the adapters merged in."""
    base = adapter_base(path)
    if base is None:
        return auto_class.from_pretrained(path, **kwargs)
    return merge_adapter_folder(_from_pretrained(auto_class, base, **kwargs), path)


def load_model_config(
    path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """A model's `config.json` (positions, architectures) without its weights."""
    from transformers import AutoConfig  # why: transformers is slow to import

    base = adapter_base(path)  # an adapter folder has its base model's config
    if base is not None:
        return load_model_config(base, revision, trust_remote_code)
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def resolve_device(device: str) -> torch.device:
    import torch  # why: as in load_pretrained

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(
    name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
    trust_remote_code: bool = False, what: str = "model", setting: str = "model",
) -> tuple[Any, Any]:  # fmt: skip
    """(tokenizer, model) in eval mode on `device`; a model that cannot be loaded is a one-line
    ConfigError naming the setting (`what` and `setting` say whose and which). Used by the HF
    judge and `openrlaif generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # why: transformers is slow to import

    name = resolve_model_path(name)  # builtin:hh-tiny-gpt, tiny:gpt2 -> their folders
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
        model: Any = _from_pretrained(
            AutoModelForCausalLM,
            name,
            dtype=dtype,
            device_map=str(device) if device.type == "cuda" else None,
            **common,
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        raise ConfigError(
            f"{what}: cannot load model {name!r} ({first_line(e)}); "
            f"set `{setting}:` to a local model folder or a Hugging Face model id"
        ) from None
    if model.device != device:
        model.to(device)
    model.eval()
    return tokenizer, model


def local_weights_stamp(model: str) -> str | None:
    """A hash of the names, sizes and mtimes of a local model folder's files (None for hub ids):
    retraining a model in place must not reuse the old model's cached judgments."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = f.stat()
            digest.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
