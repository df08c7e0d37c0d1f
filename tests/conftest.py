"""Shared fixtures: tiny real models built locally (no hub), an isolated judgment cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precision is float32 here whatever the CPU, so the suite computes the same on a CPU with
# bf16 instructions as on one without (tests/test_precision.py injects both answers)
os.environ["OPENRLAIF_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 architecture model with a byte-level BPE tokenizer (" 1" is one token)."""
    from openrlaif.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama architecture model with a metaspace tokenizer (digits split) and a chat template."""
    from openrlaif.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3's attention pattern (sliding-window layers of 16 tokens, then a full one), no chat template."""
    from openrlaif.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gemma3"), arch="gemma3", num_layers=3, seed=2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RL prompts: the prompts of 64 toy SFT rows (tests/training_toys.py), one file per module."""
    from training_toys import sft_rows, write

    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(64)]
    return write(tmp_path_factory.mktemp("rl") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a loaded machine spinning OpenMP
    threads made these runs 20x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's real judgment cache from a test."""
    monkeypatch.setenv("OPENRLAIF_CACHE", str(tmp_path / "judgments.sqlite3"))
