"""HFJudge on tiny real models: GPT-2 (byte-level BPE, no chat template) and Llama (digits split,
chat template, used in "auto" mode).

Every number the judge returns is checked against a straightforward computation written here:
the whole prompt in one unbatched forward pass, no cache, label tokens looked up by hand.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from openrlaif.config import HFJudgeConfig
from openrlaif.data.datasets import load_pairs
from openrlaif.errors import ConfigError, JudgeError
from openrlaif.judges import build_judge, hf
from openrlaif.judges.base import OrderedPair
from openrlaif.judges.cache import JudgmentCache, judgment_key
from openrlaif.judges.hf import HFJudge
from openrlaif.judges.prompts import load_template_set
from openrlaif.judges.tokens import encode_continuation
from openrlaif.models.loading import local_weights_stamp

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str, str]]:
    """Five HH-RLHF pairs, contexts cut to their last 300 characters to keep the tests quick."""
    records = load_pairs("hh-harmless").records[:5]
    return [(r.prompt[-300:], r.response_a, r.response_b) for r in records]


@pytest.fixture(scope="module")
def model_dirs(tiny_gpt2: Path, tiny_llama: Path, tiny_gemma3: Path) -> dict[str, Path]:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3}


def make_judge(path: Path, **overrides: Any) -> HFJudge:
    return HFJudge(HFJudgeConfig(model=str(path), **overrides))


@pytest.fixture(scope="module")
def judges(model_dirs: dict[str, Path]) -> dict[str, HFJudge]:
    return {arch: make_judge(path) for arch, path in model_dirs.items()}


# ------------------------------------------------------------ the straightforward reference


def hand_label_ids(tok: Any, label: str) -> list[int]:
    """The label's tokens, looked up in the vocabulary by hand: the bare digit and, where the
    vocabulary has one, the space-merged form ("Ġ1" in GPT-2, "▁1" in SentencePiece)."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in (label, "Ġ" + label, "▁" + label) if t in vocab]


def full_prompt_ids(judge: HFJudge, prefix: str, sample: str, tail: str) -> list[int]:
    """prefix + sample + tail as one prompt, tokenized as shared part + per-item part."""
    tok = judge.tokenizer
    if not judge.use_chat:
        return tok(prefix, add_special_tokens=True)["input_ids"] + encode_continuation(tok, sample + tail)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prefix + sample}], tokenize=False, add_generation_prompt=True
    )
    cut = rendered.index(sample)
    return tok(rendered[:cut], add_special_tokens=False)["input_ids"] + encode_continuation(
        tok, rendered[cut:] + tail
    )


def last_log_probs(judge: HFJudge, ids: list[int], n_last: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -n_last:]
    return logits.float().log_softmax(dim=-1)


def reference_p_first(
    judge: HFJudge, context: str, first: str, second: str, rationale: str | None = None
) -> float:
    t = judge.templates.pairwise
    sample = t.sample.format(context=context.strip(), response_1=first.strip(), response_2=second.strip())
    tail = t.suffix(context, first, second, rationale)[len(sample) :]
    lp = last_log_probs(judge, full_prompt_ids(judge, t.prefix(), sample, tail))[0]
    l1 = torch.logsumexp(lp[hand_label_ids(judge.tokenizer, "1")], dim=0).item()
    l2 = torch.logsumexp(lp[hand_label_ids(judge.tokenizer, "2")], dim=0).item()
    return math.exp(l1) / (math.exp(l1) + math.exp(l2))


def reference_score(judge: HFJudge, context: str, response: str) -> tuple[float, float]:
    """(expected 1-10 score, score in [-1, 1]); "10" = "1" then "0" in both tiny tokenizers."""
    t, tok = judge.templates.score, judge.tokenizer
    vocab = tok.get_vocab()
    sample = t.sample.format(context=context.strip(), response=response.strip())
    ids = full_prompt_ids(judge, t.prefix(), sample, t.ending) + [vocab["1"]]
    lp = last_log_probs(judge, ids, n_last=2)
    p_next, p_after_one = lp[0].exp(), lp[1].exp()
    p_one_token = p_next[hand_label_ids(tok, "1")].sum().item()
    p_zero = p_after_one[vocab["0"]].item()
    probs = [p_one_token * (1 - p_zero)] + [p_next[vocab[str(i)]].item() for i in range(2, 10)]
    probs.append(p_one_token * p_zero)
    total = sum(probs)
    expected = sum((i + 1) * p / total for i, p in enumerate(probs))
    return expected, 2 * (expected - 1) / 9 - 1


def both_orders(pairs: list[tuple[str, str, str]]) -> list[OrderedPair]:
    items = []
    for context, a, b in pairs:
        items += [OrderedPair(context, a, b), OrderedPair(context, b, a)]
    return items


# ------------------------------------------------------------ (a)+(b) batched + cached == reference


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
def test_soft_labels_match_the_unbatched_full_prompt_reference(
    arch: str, model_dirs: dict[str, Path], pairs: list[tuple[str, str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Allow any padding, so batches really are multi-row and padded (the CPU default keeps them tight).
    monkeypatch.setattr(hf, "_PAD_TOLERANCE_CPU", 100.0)
    items = both_orders(pairs) + [OrderedPair(pairs[0][0], "Sure, here you go.", "No.")]
    first = make_judge(model_dirs[arch])
    assert first.use_chat is (arch == "llama")  # "auto": the Llama tokenizer has a chat template
    expected = [reference_p_first(first, i.prompt, i.first, i.second) for i in items]
    assert min(expected) > 0.05 and max(expected) < 0.95 and max(expected) - min(expected) > 1e-3
    for reuse in (True, False):
        for batch_size in (1, 3, 4, 16):  # 3 and 4 do not divide 11 items
            judge = make_judge(model_dirs[arch], batch_size=batch_size, reuse_prefix_cache=reuse)
            got = [j.p_first for j in judge.judge_orders(items)]
            assert got == pytest.approx(expected, abs=1e-4), (reuse, batch_size)
            assert (judge._prefix_kv.get("pair") is not None) is reuse  # the cache really was reused


def test_chat_template_off_changes_the_prompt(
    model_dirs: dict[str, Path], pairs: list[tuple[str, str, str]]
) -> None:
    off = make_judge(model_dirs["llama"], chat_template="off")
    assert off.use_chat is False
    item = OrderedPair(*pairs[0])
    got = off.judge_orders([item])[0].p_first
    assert got == pytest.approx(reference_p_first(off, item.prompt, item.first, item.second), abs=1e-4)
    on = make_judge(model_dirs["llama"], chat_template="on")
    assert abs(on.judge_orders([item])[0].p_first - got) > 1e-5
    assert off.fingerprint("pair") != on.fingerprint("pair")


# ------------------------------------------------------------ (c) both orders averaged


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_averages_both_orders(
    arch: str, judges: dict[str, HFJudge], pairs: list[tuple[str, str, str]]
) -> None:
    judge = judges[arch]
    context, a, b = pairs[1]
    ab = reference_p_first(judge, context, a, b)
    ba = reference_p_first(judge, context, b, a)
    got = judge.compare(context, a, b)
    assert got.p_a_ab == pytest.approx(ab, abs=1e-4)
    assert got.p_a_ba == pytest.approx(1 - ba, abs=1e-4)
    assert got.p_a == pytest.approx((ab + 1 - ba) / 2, abs=1e-4)
    assert abs(ab - (1 - ba)) > 1e-4  # the two orders really differ, so averaging is tested


# ------------------------------------------------------------ (d) chain of thought


def test_cot_greedy_rationale_then_scored_labels(
    model_dirs: dict[str, Path], pairs: list[tuple[str, str, str]]
) -> None:
    judge = make_judge(model_dirs["gpt2"], cot=True, max_rationale_tokens=6, batch_size=2)
    items = [OrderedPair(*p) for p in pairs[:3]]
    out = judge.judge_orders(items)
    t, tok = judge.templates.pairwise, judge.tokenizer
    for item, judgment in zip(items, out, strict=True):
        assert len(judgment.rationales) == 1
        # Step 1 by hand: greedy decoding after the request to explain, one prompt at a time.
        sample = t.sample.format(
            context=item.prompt.strip(), response_1=item.first.strip(), response_2=item.second.strip()
        )
        ids = full_prompt_ids(
            judge, t.prefix(), sample, t.cot_suffix(item.prompt, item.first, item.second)[len(sample) :]
        )
        generated = judge.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
        rationale = tok.decode(generated[0, len(ids) :], skip_special_tokens=True).split(t.ending)[0].strip()
        assert judgment.rationales == [rationale]
        # Step 2: the label tokens scored after the rationale.
        assert judgment.p_first == pytest.approx(
            reference_p_first(judge, item.prompt, item.first, item.second, rationale), abs=1e-4
        )
    again = make_judge(model_dirs["gpt2"], cot=True, max_rationale_tokens=6).judge_orders(items)
    assert [(j.p_first, j.rationales) for j in again] == [(j.p_first, j.rationales) for j in out]


@pytest.mark.parametrize("arch", ARCHS)
def test_self_consistency_averages_seeded_samples(
    arch: str, model_dirs: dict[str, Path], pairs: list[tuple[str, str, str]]
) -> None:
    settings = {"cot": True, "self_consistency": 3, "temperature": 1.0, "max_rationale_tokens": 5, "seed": 7}
    judge = make_judge(model_dirs[arch], **settings)
    items = [OrderedPair(*pairs[0]), OrderedPair(*pairs[2])]
    out = judge.judge_orders(items)
    for item, judgment in zip(items, out, strict=True):
        assert len(judgment.rationales) == 3 and len(set(judgment.rationales)) > 1
        each = [
            reference_p_first(judge, item.prompt, item.first, item.second, r) for r in judgment.rationales
        ]
        assert judgment.p_first == pytest.approx(sum(each) / 3, abs=1e-4)
    # Seeded: the same rationales on a rerun, even when the item is judged alone.
    alone = make_judge(model_dirs[arch], **settings).judge_orders(items[1:])
    assert alone[0].rationales == out[1].rationales
    reseeded = make_judge(model_dirs[arch], **{**settings, "seed": 8}).judge_orders(items[:1])
    assert reseeded[0].rationales != out[0].rationales


# ------------------------------------------------------------ (e) direct score


@pytest.mark.parametrize("arch", ARCHS)
def test_score_is_the_rescaled_expected_score(
    arch: str, judges: dict[str, HFJudge], pairs: list[tuple[str, str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf, "_PAD_TOLERANCE_CPU", 100.0)
    judge = judges[arch]
    items = [(c, r) for c, a, b in pairs[:3] for r in (a, b)]
    got = judge.score_responses(items)
    for (context, response), judgment in zip(items, got, strict=True):
        expected, score = reference_score(judge, context, response)
        assert judgment.expected == pytest.approx(expected, abs=1e-4)
        assert judgment.score == pytest.approx(score, abs=1e-4)
        assert -1.0 <= judgment.score <= 1.0
    assert judge.score(*items[0]) == pytest.approx(got[0].score, abs=1e-6)
    uncached = make_judge(judge.config.model, reuse_prefix_cache=False, batch_size=4).score_responses(items)
    assert [j.score for j in uncached] == pytest.approx([j.score for j in got], abs=1e-5)


# ------------------------------------------------------------ (f) over-long prompts


@pytest.mark.parametrize("arch", ARCHS)
def test_long_context_is_cut_from_the_left_and_counted(arch: str, model_dirs: dict[str, Path]) -> None:
    probe = make_judge(model_dirs[arch])
    max_length = len(probe._prefix_ids["pair"]) + 80
    judge = make_judge(model_dirs[arch], max_length=max_length)
    filler = "Human: tell me about the weather in the mountains today. " * 40
    long_a = OrderedPair("Opening words that get cut. " + filler, "It is sunny.", "Go away.")
    long_b = OrderedPair("Other opening words, also cut. " + filler, "It is sunny.", "Go away.")
    short = OrderedPair("Human: hi", "Hello!", "Bye.")
    out = judge.judge_orders([long_a, long_b, short])
    assert judge.truncated == 2
    assert all(0.0 < j.p_first < 1.0 for j in out)
    # Only the start of the context was cut: contexts differing there give the same answer...
    assert out[0].p_first == pytest.approx(out[1].p_first, abs=1e-6)
    # ...the responses and the ending were kept, so changing a response changes it.
    other = judge.judge_orders([OrderedPair(long_a.prompt, "It is raining.", "Go away.")])[0]
    assert abs(other.p_first - out[0].p_first) > 1e-6 and judge.truncated == 3
    # A short prompt is untouched: the same as without any limit.
    assert out[2].p_first == pytest.approx(probe.judge_orders([short])[0].p_first, abs=1e-5)
    score = judge.score_responses([(long_a.prompt, long_a.first)])[0]
    assert -1.0 <= score.score <= 1.0 and judge.truncated == 4


def test_cut_keeps_the_context_header_and_the_end_of_the_context(model_dirs: dict[str, Path]) -> None:
    probe = make_judge(model_dirs["gpt2"])
    prefix_ids = probe.tokenizer(probe.templates.pairwise.prefix())["input_ids"]
    max_length = len(prefix_ids) + 60
    judge = make_judge(model_dirs["gpt2"], max_length=max_length)
    context = " ".join(f"Human: question number {i} about cooking?" for i in range(30))
    item = OrderedPair(context, "Boil the pasta.", "I will not help.")
    # By hand: "Context - " + the last tokens of the context that fit + responses + ending.
    tok, t = judge.tokenizer, judge.templates.pairwise
    head = encode_continuation(tok, "Context - ")
    body = encode_continuation(tok, context)
    rest = encode_continuation(tok, f"\nResponse 1 - {item.first}\nResponse 2 - {item.second}\n{t.ending}")
    keep = max_length - len(prefix_ids) - len(head) - len(rest)
    assert 0 < keep < len(body)
    lp = last_log_probs(judge, prefix_ids + head + body[-keep:] + rest)[0]
    l1, l2 = (torch.logsumexp(lp[hand_label_ids(tok, label)], dim=0).item() for label in "12")
    assert judge.judge_orders([item])[0].p_first == pytest.approx(1 / (1 + math.exp(l2 - l1)), abs=1e-4)
    assert judge.truncated == 1


def test_max_length_smaller_than_the_prefix_is_a_config_error(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="raise max_length"):
        make_judge(model_dirs["gpt2"], max_length=40)


# ------------------------------------------------------------ (g) cache


def test_second_compare_comes_from_the_cache(
    model_dirs: dict[str, Path],
    pairs: list[tuple[str, str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = JudgmentCache(tmp_path / "judgments.sqlite3")
    judge = build_judge(HFJudgeConfig(model=str(model_dirs["gpt2"])), cache=cache)
    assert isinstance(judge, HFJudge) and judge.cache is cache
    first = judge.compare_many(pairs[:3])
    assert cache.misses == 6 and len(cache) == 6 and not any(c.cached for c in first)

    def fail(items: Any) -> Any:
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(judge, "judge_orders", fail)
    second = judge.compare_many(pairs[:3])
    assert all(c.cached for c in second) and cache.hits == 6
    assert [c.p_a for c in second] == pytest.approx([c.p_a for c in first], abs=1e-9)

    # A decoding setting changes the key; a speed-only setting does not.
    texts = pairs[0]
    key = judgment_key(judge.fingerprint("pair"), "pair", texts)
    cot = make_judge(model_dirs["gpt2"], cot=True, max_rationale_tokens=4)
    assert judgment_key(cot.fingerprint("pair"), "pair", texts) != key
    longer = make_judge(model_dirs["gpt2"], max_rationale_tokens=9)
    assert judgment_key(longer.fingerprint("pair"), "pair", texts) != key
    batched = make_judge(model_dirs["gpt2"], batch_size=3, reuse_prefix_cache=False)
    assert judgment_key(batched.fingerprint("pair"), "pair", texts) == key
    cot.cache = cache
    cot.compare_many(pairs[:1])
    assert cache.misses == 8


def test_fingerprint_names_what_changes_answers(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    judge = make_judge(model_dirs["gpt2"])
    fp = judge.fingerprint("pair")
    templates = load_template_set("harmless")
    assert fp["backend"] == "hf" and fp["model"] == str(model_dirs["gpt2"])
    assert fp["template"] == templates.pairwise.hash() == judge.template_hash("pair")
    assert judge.fingerprint("score")["template"] == templates.score.hash()
    assert fp["chat_template"] is False and fp["dtype"] == "float32" and fp["max_length"] == 2048
    assert {"cot", "self_consistency", "temperature", "max_rationale_tokens", "seed", "revision"} <= set(fp)
    assert judge.identity("pair").template_hash == templates.pairwise.hash()
    assert judge.model_name == str(model_dirs["gpt2"])
    # Retraining in place (new mtime) changes the weights stamp (on a copy: the fixture is shared).
    copy = Path(shutil.copytree(model_dirs["gpt2"], tmp_path / "model"))
    before = local_weights_stamp(str(copy))
    assert before is not None and len(before) == 16
    weights = next(copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert local_weights_stamp(str(copy)) != before
    assert local_weights_stamp("some-org/some-model") is None


# ------------------------------------------------------------ errors


def test_unloadable_model_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot load model .*set `model:`") as err:
        make_judge(tmp_path / "no-such-model")
    assert "\n" not in str(err.value)


def test_chat_template_on_without_one_is_a_config_error(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="has no chat template"):
        make_judge(model_dirs["gpt2"], chat_template="on")


def test_labels_without_a_single_token_are_a_judge_error(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    templates = load_template_set("harmless").model_dump(mode="json")
    templates["pairwise"]["labels"] = ["First", "Second"]
    path = tmp_path / "words.yaml"
    path.write_text(yaml.safe_dump(templates), encoding="utf-8")
    with pytest.raises(JudgeError, match="label 'First' is not a single token"):
        make_judge(model_dirs["gpt2"], template=str(path))


def test_a_constitution_shows_k_principles_per_pair_the_same_in_both_orders(
    model_dirs: dict[str, Path], pairs: list[tuple[str, str, str]]
) -> None:
    from openrlaif.errors import ConfigError
    from openrlaif.judges.prompts import load_judge_templates, load_principles

    shipped = load_principles("harmless")
    assert len(shipped) == 12
    t = load_judge_templates("harmless", "harmless", 3, seed=0).pairwise
    draws = [t.principles_for(*p) for p in pairs]
    assert all(len(d) == 3 and set(d) <= set(shipped) for d in draws)
    assert all(
        t.principles_for(c, b, a) == d for (c, a, b), d in zip(pairs, draws, strict=True)
    )  # order-free
    assert len({tuple(d) for d in draws}) > 1  # each pair its own draw
    others = [
        load_judge_templates("harmless", "harmless", 3, seed=s).pairwise.principles_for(*pairs[0])
        for s in (1, 2, 3)
    ]
    assert any(o != draws[0] for o in others)  # the judge's seed picks the draws
    context, a, b = pairs[0]
    sample = t.sample.format(context=context.strip(), response_1=a.strip(), response_2=b.strip())
    block = "For this comparison, weigh these principles:\n" + "".join(f"- {x}\n" for x in draws[0]) + "\n"
    assert t.suffix(*pairs[0]) == sample + block + t.ending  # after the responses, before the ending
    assert t.cot_suffix(*pairs[0]) == sample + block + t.cot_instruction
    assert t.hash() != load_judge_templates("harmless").pairwise.hash()  # cached judgments kept apart
    assert (
        load_judge_templates("harmless", ["Be kind.", "Be brief."], 1).pairwise.principles_per_judgment == 1
    )
    with pytest.raises(ConfigError, match="principles_per_judgment 13 is more than the 12 principles"):
        load_judge_templates("harmless", "harmless", 13)
    with pytest.raises(
        ConfigError, match=r"no-such-constitution: no such file, and not a shipped constitution \(harmless\)"
    ):
        load_judge_templates("harmless", "no-such-constitution", 1)

    # the HF judge: the principles are in the per-pair part, so prefix reuse gives the full prompt's labels
    items = both_orders(pairs[:3])
    for reuse in (True, False):
        judge = make_judge(
            model_dirs["gpt2"], principles="harmless", principles_per_judgment=2, reuse_prefix_cache=reuse
        )
        expected = [reference_p_first(judge, i.prompt, i.first, i.second) for i in items]
        assert [j.p_first for j in judge.judge_orders(items)] == pytest.approx(expected, abs=1e-4)
    plain = [j.p_first for j in make_judge(model_dirs["gpt2"]).judge_orders(items)]
    assert plain != pytest.approx(expected, abs=1e-4)  # the principles change what the judge reads
