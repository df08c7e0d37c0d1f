"""`auto` precision, chosen in one place (models/precision.py) for every component that runs a
model: bf16 where the hardware computes it natively, float32 elsewhere. Both branches are tested
by injecting what the CPU has (torch's probes), whatever CPU runs the suite."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch

from openrlaif.models import precision
from openrlaif.models.precision import CPU_BF16_ENV, choose_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Make torch report a CPU with (or without) AVX512-BF16 / AMX, and no override set."""

    def make(avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.delenv(CPU_BF16_ENV, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(
            torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if avx512_bf16 else "AVX2"
        )
        precision._cpu_instructions.cache_clear()

    yield make
    precision._cpu_instructions.cache_clear()


def test_auto_is_float32_on_a_cpu_without_bf16_instructions(cpu_with: Callable[..., None]) -> None:
    cpu_with(avx512_bf16=False, amx=False)
    chosen = choose_precision("auto", CPU)
    assert chosen.dtype == torch.float32 and not chosen.bf16 and chosen.mixed_precision == "no"
    line = chosen.line()
    assert re.fullmatch(r"cpu \(.+; AVX2, no bf16 instructions\): float32 \(auto\), \d+ threads", line), line
    assert f"{torch.get_num_threads()} threads" in line


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "units"), [(True, False, "AVX512-BF16"), (False, True, "AMX")]
)
def test_auto_is_bf16_on_a_cpu_with_bf16_instructions(
    cpu_with: Callable[..., None], avx512_bf16: bool, amx: bool, units: str
) -> None:
    cpu_with(avx512_bf16=avx512_bf16, amx=amx)
    chosen = choose_precision("auto", CPU)
    assert chosen.dtype == torch.bfloat16 and chosen.bf16 and chosen.mixed_precision == "bf16"
    assert f"bf16 instructions ({units})): bfloat16 (auto)" in chosen.line()


def test_a_precision_set_explicitly_is_kept_whatever_the_cpu(cpu_with: Callable[..., None]) -> None:
    cpu_with(avx512_bf16=False)
    assert choose_precision("bfloat16", CPU).dtype == torch.bfloat16
    assert (
        choose_precision("bf16", CPU)
        .line()
        .endswith("bfloat16 (as set), " + f"{torch.get_num_threads()} threads")
    )
    cpu_with(avx512_bf16=True)
    for name in ("float32", "no"):
        assert choose_precision(name, CPU).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        choose_precision("fp8", CPU)


def test_the_environment_overrides_what_the_cpu_is_taken_to_have(
    cpu_with: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_with(avx512_bf16=True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    chosen = choose_precision("auto", CPU)
    assert chosen.dtype == torch.float32
    assert f"bf16 not used: {CPU_BF16_ENV}=0): float32 (auto)" in chosen.line()
    cpu_with(avx512_bf16=False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert choose_precision("auto", CPU).dtype == torch.bfloat16


def test_every_component_takes_auto_from_the_same_place(cpu_with: Callable[..., None]) -> None:
    """The trainers' mixed precision, the embedding judge's autocast (and its cache key) and the
    reward model as a scorer follow the same answer."""
    from openrlaif.config import EmbeddingJudgeConfig
    from openrlaif.judges.embedding import EmbeddingJudge
    from openrlaif.training.accelerator import make_accelerator, training_precision
    from openrlaif.training.config import TrainConfig

    for native, dtype, mixed in ((False, "float32", "no"), (True, "bfloat16", "bf16")):
        cpu_with(avx512_bf16=native)
        train = TrainConfig(model="tiny:llama", data="hh-harmless", output_dir="unused", cpu=True)
        assert training_precision(train).mixed_precision == mixed
        assert make_accelerator(train).mixed_precision == mixed
        judge = EmbeddingJudge(EmbeddingJudgeConfig(rubric="I can't help with that."))
        assert judge.fingerprint("pair")["dtype"] == dtype
        assert judge.runs_on() == [f"judge embedding (packaged:all-MiniLM-L6-v2): {judge.precision.line()}"]
