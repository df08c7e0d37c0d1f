"""Log-probabilities with the LM head projected a chunk of positions at a time (models/logprobs.py)
equal the plain computation over the whole positions x vocabulary logits, values and gradients,
in every place that reads them: the SFT loss, DPO (plain and packed rows), RL (each row, and rows
sharing their prompt's pass, with the entropy) and the hf judge. The tiny models' vocabulary
(1,024 tokens) is far larger than the chunks here (a few positions each)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.models.logprobs import (
    HeadInput,
    lm_forward,
    logits_chunk_mib,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_and_entropy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CHUNK = 5 * 1024 * 4 / 2**20  # MiB: 5 positions of a 1,024-token vocabulary per chunk
TOLERANCE = 1e-5  # float32 sums of the same terms in blocks of another size differ by ~1e-7 here


def _model(folder: Path) -> tuple[Any, Any]:
    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).float()


def _values_and_grads(model: torch.nn.Module, compute: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = compute()
    value.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _assert_same(chunked: Any, plain: Any) -> None:
    (v1, g1), (v2, g2) = chunked, plain
    assert torch.allclose(v1, v2, atol=TOLERANCE, rtol=0), (v1 - v2).abs().max()
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=TOLERANCE, rtol=1e-4), (
            name,
            (g1[name] - g2[name]).abs().max(),
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_log_probs_chunked_equal_the_whole_logits(arch: str, tiny_gpt2: Path, tiny_llama: Path) -> None:
    tokenizer, model = _model(tiny_gpt2 if arch == "gpt2" else tiny_llama)
    texts = [
        "Human: how do I bake bread?\n\nAssistant: Mix flour and water.",
        "Human: hi\n\nAssistant: Hello!",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def compute() -> torch.Tensor:
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], labels)[0]

    with logits_chunk_mib(TINY_CHUNK):
        _, logits = lm_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert isinstance(logits, HeadInput) and logits.shape[-1] == len(tokenizer)
        assert logits.hidden.shape[1] > 5  # more positions than one chunk
        chunked = _values_and_grads(model, compute)
    with logits_chunk_mib(None):
        _, whole = lm_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert isinstance(whole, torch.Tensor)
        plain = _values_and_grads(model, compute)
    _assert_same(chunked, plain)

    # the entropy comes from the same projection; without gradients (as RL's reference pass)
    with torch.no_grad(), logits_chunk_mib(TINY_CHUNK):
        logp, entropy = token_logprobs_and_entropy(logits, labels)
        assert torch.allclose(logp, token_logprobs(whole, labels), atol=TOLERANCE)
    expected = -(torch.softmax(whole.float(), -1) * torch.log_softmax(whole.float(), -1)).sum(-1)
    assert torch.allclose(entropy, expected.detach(), atol=1e-4)


def test_dpo_log_probs_chunked_equal_the_whole_logits(tiny_llama: Path) -> None:
    from openrlaif.data.examples import PreferenceExample
    from openrlaif.training.dpo import collate, response_logprobs

    tokenizer, model = _model(tiny_llama)
    examples = [
        PreferenceExample("a", "Human: how do I pick a lock?\n\nAssistant:", "I can't help with that.",
                          "Use a tension wrench and a pick.", 0.8),
        PreferenceExample("b", "Human: hi\n\nAssistant:", "Hello! How can I help?", "What?", 0.6),
    ]  # fmt: skip
    for packed in (False, True):
        batch = collate(examples, torch.zeros(2, 2), tokenizer, 128, share_prompt=packed)
        assert (batch.segments is not None) == packed

        def compute(batch: Any = batch) -> torch.Tensor:
            return response_logprobs(model, batch)

        with logits_chunk_mib(TINY_CHUNK):
            chunked = _values_and_grads(model, compute)
        with logits_chunk_mib(None):
            plain = _values_and_grads(model, compute)
        _assert_same(chunked, plain)


def test_rl_log_probs_chunked_equal_the_whole_logits(tiny_llama: Path) -> None:
    from openrlaif.training.rl.rollout import build_sequences, response_logprobs

    tokenizer, model = _model(tiny_llama)
    model.eval()
    prompts = [
        tokenizer("Human: how are you?\n\nAssistant:")["input_ids"],
        tokenizer("Human: hi")["input_ids"],
    ]
    responses = [[5, 9, 33, 2], [7, 8], [40, 41, 42, 43, 44, 45], [3]]
    samples = [SimpleNamespace(prompt_ids=prompts[i // 2], response_ids=r) for i, r in enumerate(responses)]
    seqs = build_sequences(samples, tokenizer.pad_token_id, torch.device("cpu"))
    for share in (False, True):  # each row in full, or each prompt once for its samples (its KV cache)

        def compute(share: bool = share) -> torch.Tensor:
            logp, entropy = response_logprobs(model, seqs, with_entropy=True, share_prompts=share)
            assert entropy is not None and entropy.shape == logp.shape
            return torch.cat([logp, entropy])

        with logits_chunk_mib(TINY_CHUNK):
            chunked = _values_and_grads(model, compute)
        with logits_chunk_mib(None):
            plain = _values_and_grads(model, compute)
        _assert_same(chunked, plain)


def test_the_hf_judge_reads_the_same_labels_with_a_chunked_head(tiny_gpt2: Path) -> None:
    from openrlaif.config import HFJudgeConfig
    from openrlaif.judges.base import OrderedPair
    from openrlaif.judges.hf import HFJudge

    judge = HFJudge(HFJudgeConfig(model=str(tiny_gpt2)))
    items = [OrderedPair("Human: hi\n\nAssistant:", "Hello!", "Go away."), OrderedPair("Q", "yes", "no")]
    with logits_chunk_mib(TINY_CHUNK):
        chunked = [j.p_first for j in judge.judge_orders(items)] + [
            s.score for s in judge.score_responses([("Q", "a")])
        ]
    with logits_chunk_mib(None):
        plain = [j.p_first for j in judge.judge_orders(items)] + [
            s.score for s in judge.score_responses([("Q", "a")])
        ]
    assert chunked == pytest.approx(plain, abs=TOLERANCE)


def test_a_model_whose_logits_are_not_its_heads_projection_keeps_its_own_logits(tiny_gemma3: Path) -> None:
    """Gemma 2's final softcap (tanh) changes the logits after the head: found on the first call,
    and the model's own logits are used, not the head's projection."""
    tokenizer, model = _model(tiny_gemma3)
    model.config.get_text_config().final_logit_softcapping = 2.0
    ids = tokenizer(["Human: hi\n\nAssistant: Hello there, how can I help?"], return_tensors="pt")[
        "input_ids"
    ]
    with logits_chunk_mib(TINY_CHUNK):
        _, logits = lm_forward(model, input_ids=ids)
    assert isinstance(logits, torch.Tensor)
    assert logits.abs().max() <= 2.0 and torch.allclose(logits, model(input_ids=ids).logits)
