"""Label-token discovery (judges/tokens.py) on the two tiny tokenizers, and the probability math."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from openrlaif.errors import JudgeError
from openrlaif.judges.tokens import (
    ScoreTokens,
    encode_continuation,
    label_log_probs,
    label_token_ids,
    pair_label_ids,
    pair_probability,
    score_label_tokens,
    score_log_distribution,
)

PAIR_ENDING = "Preferred Response="
SCORE_ENDING = "SCORE: "
SCALE = [str(i) for i in range(1, 11)]


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def tokens(tok: Any, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------ GPT-2 style: " 1" is one token


def test_gpt2_finds_bare_and_space_merged_digit(gpt2_tok: Any) -> None:
    vocab = gpt2_tok.get_vocab()
    # What this tokenizer does (the premise of the test): " 1" merges into "Ġ1", "1" stays bare.
    assert tokens(gpt2_tok, " 1") == ["Ġ1"]
    assert tokens(gpt2_tok, PAIR_ENDING + "1")[-1] == "1"
    assert label_token_ids(gpt2_tok, "1", PAIR_ENDING) == sorted([vocab["1"], vocab["Ġ1"]])
    # "2" has no merged form in this small vocabulary: only the bare digit.
    assert "Ġ2" not in vocab
    assert label_token_ids(gpt2_tok, "2", PAIR_ENDING) == [vocab["2"]]


def test_gpt2_ten_is_two_tokens_read_with_a_lead(gpt2_tok: Any) -> None:
    vocab = gpt2_tok.get_vocab()
    assert tokens(gpt2_tok, "10") == ["1", "0"] and "10" not in vocab and "Ġ10" not in vocab
    with pytest.raises(JudgeError, match="not a single token"):
        label_token_ids(gpt2_tok, "10", SCORE_ENDING)
    plan = score_label_tokens(gpt2_tok, SCALE, SCORE_ENDING)
    # The prompt ends with "Ġ" ("SCORE: "), so "10" continues as the bare "1" then "0".
    assert plan.lead == vocab["1"]
    assert plan.lead_label == 0
    assert plan.two_token == ((9, vocab["0"]),)
    assert plan.ids[9] == ()
    assert plan.ids[0] == tuple(sorted([vocab["1"], vocab["Ġ1"]]))
    assert plan.ids[6] == (vocab["7"],)


def test_gpt2_continuation_encoding_is_plain_encoding(gpt2_tok: Any) -> None:
    text = "Context - hello there\nResponse 1 - fine"
    assert encode_continuation(gpt2_tok, text) == gpt2_tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------ Llama style: digits split, "▁" alone


def test_llama_finds_bare_digit_when_space_is_its_own_token(llama_tok: Any) -> None:
    vocab = llama_tok.get_vocab()
    assert tokens(llama_tok, PAIR_ENDING + " 1")[-2:] == ["▁", "1"]
    assert "▁1" not in vocab
    assert pair_label_ids(llama_tok, ["1", "2"], PAIR_ENDING) == [[vocab["1"]], [vocab["2"]]]


def test_llama_ten_after_a_space_token(llama_tok: Any) -> None:
    vocab = llama_tok.get_vocab()
    assert tokens(llama_tok, SCORE_ENDING + "10")[-3:] == ["▁", "1", "0"]
    plan = score_label_tokens(llama_tok, SCALE, SCORE_ENDING)
    assert plan.lead == vocab["1"] and plan.lead_label == 0
    assert plan.two_token == ((9, vocab["0"]),)
    assert plan.ids[:9] == tuple((vocab[str(i)],) for i in range(1, 10))


def test_llama_continuation_has_no_start_of_text_space(llama_tok: Any) -> None:
    # Alone, SentencePiece-style tokenizers write "▁Context"; mid-text (after "\n\n") it is "C"...
    assert tokens(llama_tok, "Context - hi")[0] == "▁C"
    assert tokens(llama_tok, "\n\nContext - hi")[:3] == ["▁", "\n\n", "C"]
    ids = encode_continuation(llama_tok, "Context - hi")
    assert llama_tok.convert_ids_to_tokens(ids) == tokens(llama_tok, "\n\nContext - hi")[2:]


# ------------------------------------------------------------ errors


def test_multi_token_label_is_a_clear_error(gpt2_tok: Any) -> None:
    with pytest.raises(JudgeError, match=r"label 'Preferred' is not a single token.*\['P', 're'"):
        label_token_ids(gpt2_tok, "Preferred", PAIR_ENDING)


def test_score_labels_one_pass_cannot_read_are_an_error(gpt2_tok: Any) -> None:
    assert tokens(gpt2_tok, "1000") == ["1", "00", "0"] and tokens(gpt2_tok, "42") == ["4", "2"]
    with pytest.raises(JudgeError, match="at most two tokens"):  # three tokens
        score_label_tokens(gpt2_tok, ["1", "2", "1000"], SCORE_ENDING)
    with pytest.raises(JudgeError, match="at most two tokens"):  # two different first tokens
        score_label_tokens(gpt2_tok, ["1", "10", "42"], SCORE_ENDING)


# ------------------------------------------------------------ the probability math


def test_pair_probability_sums_spellings_then_softmaxes() -> None:
    probs = torch.tensor([[0.05, 0.15, 0.6, 0.2]])
    ids = [[0, 1], [3]]  # label 1 = tokens 0 and 1, label 2 = token 3
    assert torch.allclose(label_log_probs(probs.log(), ids), torch.tensor([[math.log(0.2), math.log(0.2)]]))
    assert pair_probability(probs.log(), ids).item() == pytest.approx(0.5)
    probs = torch.tensor([[0.05, 0.15, 0.2, 0.6]])
    assert pair_probability(probs.log(), ids).item() == pytest.approx(0.2 / 0.8)


def test_score_distribution_splits_the_lead_between_one_and_ten() -> None:
    plan = ScoreTokens(
        labels=("1", "2", "10"), ids=((0, 1), (2,), ()), lead=0, lead_label=0, two_token=((2, 3),)
    )
    next_probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    after_lead = torch.tensor([[0.5, 0.1, 0.15, 0.25]])  # P("0" | "1") = 0.25 (token 3)
    got = score_log_distribution(next_probs.log(), after_lead.log(), plan).exp()[0]
    # P(1) = 0.3 * 0.75, P(2) = 0.3, P(10) = 0.3 * 0.25, renormalised over 0.6.
    assert torch.allclose(got, torch.tensor([0.375, 0.5, 0.125]), atol=1e-6)


def test_score_distribution_single_token_scale() -> None:
    plan = ScoreTokens(labels=("1", "2", "3"), ids=((0,), (1,), (2,)))
    probs = torch.tensor([[0.1, 0.1, 0.2, 0.6]])
    got = score_log_distribution(probs.log(), None, plan).exp()[0]
    assert torch.allclose(got, torch.tensor([0.25, 0.25, 0.5]), atol=1e-6)
