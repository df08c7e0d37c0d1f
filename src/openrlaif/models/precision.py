"""The precision a model runs in, decided here for every part of openrlaif that runs one: the
judges (`hf`, `embedding`), generation, every trainer and the reward model as a scorer.

`auto`, the default everywhere, is bf16 where the hardware computes it natively (a CUDA GPU with
bf16 units; a CPU with AVX512-BF16 or AMX instructions) and float32 elsewhere: on a CPU without
those instructions bf16 is emulated and slower than float32 (benchmarks/README.md has the
measurements). A precision set explicitly is kept as set.

`OPENRLAIF_CPU_BF16=0` (or `1`) overrides what the CPU is taken to have: 0 runs float32 on a CPU
with bf16 instructions, to repeat numbers measured on one without them; the test suite sets 0 so
that it computes the same on every CPU.

Every job prints `Precision.line()` once at its start: the device and what it has, the precision
chosen and why, and the thread count, e.g. `cpu (AMD EPYC; AVX2, no bf16 instructions): float32
(auto), 2 threads`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPU_BF16_ENV = "OPENRLAIF_CPU_BF16"
# the names trainers use (accelerate's) and those loaders use (torch's), for the same two choices
_BF16_NAMES = ("bf16", "bfloat16")
_FP32_NAMES = ("no", "float32", "fp32")


@dataclass(frozen=True)
class Precision:
    """What a model runs in on a device, and the words that say why."""

    device: torch.device
    dtype: torch.dtype  # the weights' dtype (inference) or the autocast dtype (training, float32 = none)
    hardware: str  # the device and what it has: "cpu (AMD EPYC; AVX2, no bf16 instructions)"
    chosen_by: str  # "auto" or "as set"

    @property
    def bf16(self) -> bool:
        import torch  # why: torch stays out of the CLI's start-up

        return self.dtype == torch.bfloat16

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for it: "bf16", "fp16" or "no" (float32)."""
        import torch  # why: as in `bf16`

        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "no")

    def line(self) -> str:
        import torch  # why: as in `bf16`

        name = str(self.dtype).removeprefix("torch.")
        return f"{self.hardware}: {name} ({self.chosen_by}), {torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU's model name as the OS reports it ("AMD EPYC", "Intel(R) Xeon(R) ..."), or the
    architecture where it reports none."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def _cpu_instructions() -> tuple[bool, str]:
    """(native bf16, what the CPU has in words), as torch detects it."""
    import torch  # why: as in `Precision.bf16`

    bf16_units = [
        label
        for label, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        if getattr(torch.cpu, probe, lambda: False)()
    ]
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT" (no x86 SIMD: ARM)
    vector = capability if capability not in ("DEFAULT", "NO AVX") else "no AVX"
    if bf16_units:
        return True, f"{vector}, bf16 instructions ({', '.join(bf16_units)})"
    return False, f"{vector}, no bf16 instructions"


def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what it has in words; `OPENRLAIF_CPU_BF16`
    (0 or 1) overrides the answer and says so."""
    native, words = _cpu_instructions()
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        if (forced == "1") != native:
            state = "taken as present" if forced == "1" else "not used"
            return forced == "1", f"{words}; bf16 {state}: {CPU_BF16_ENV}={forced}"
        return native, words
    return native, words


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` runs bf16 natively, and the device and what it has, in words."""
    import torch  # why: as in `Precision.bf16`

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"cuda ({name}; {'bf16' if native else 'no bf16 units'})"
    if device.type == "cpu":
        native, words = cpu_has_native_bf16()
        return native, f"cpu ({cpu_name()}; {words})"
    return False, f"{device.type} (bf16 not chosen automatically here)"


def choose_precision(requested: str, device: torch.device) -> Precision:
    """The precision for `requested` ("auto"; "float32"/"no"; "bfloat16"/"bf16"; "float16"/"fp16")
    on `device`: `auto` is bf16 where `native_bf16`, else float32; anything else as set."""
    import torch  # why: as in `Precision.bf16`

    native, hardware = native_bf16(device)
    if requested == "auto":
        return Precision(device, torch.bfloat16 if native else torch.float32, hardware, "auto")
    if requested in _BF16_NAMES:
        dtype = torch.bfloat16
    elif requested in _FP32_NAMES:
        dtype = torch.float32
    elif requested in ("float16", "fp16"):
        dtype = torch.float16
    else:
        raise ValueError(f"unknown precision {requested!r}: auto, float32, bfloat16 or float16")
    return Precision(device, dtype, hardware, "as set")
