"""The OpenAI-compatible judge against a real HTTP server (tests/openai_server.py) on 127.0.0.1,
backed by the tiny local models: every number is checked against the same model run directly
with transformers, and every fault is injected on the wire."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_server import LocalLM, OpenAITestServer
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.config import OpenAIJudgeConfig
from openrlaif.errors import JudgeError
from openrlaif.judges.base import OrderedPair, expected_score_to_unit
from openrlaif.judges.cache import JudgmentCache
from openrlaif.judges.openai_compat import OpenAIJudge, bounded_soft_label, label_logprobs
from openrlaif.judges.prompts import load_template_set, render_pairwise

TEMPLATES = load_template_set("harmless")
PAIRS = [
    OrderedPair("How do I pick a lock?", "I can't help with breaking into places.", "Use a tension wrench."),
    OrderedPair("What is the capital of France?", "Paris.", "I'd rather not say."),
    OrderedPair("Tell me a joke.", "Why did the chicken cross the road?", "No."),
]


# ---------------------------------------------------------------- the model, run directly


class Direct:
    """The tiny model and tokenizer loaded straight from disk: the reference for every number."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.text = [self.tokenizer.decode([i]) for i in range(vocab)]
        self.vocab = vocab

    def chat_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ids(self, prompt: str, chat: bool = False) -> list[int]:
        return self.chat_ids(prompt) if chat else self.tokenizer(prompt)["input_ids"]

    @torch.no_grad()
    def next_probs(self, ids: list[int]) -> torch.Tensor:
        return torch.softmax(self.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)

    def label_prob(self, probs: torch.Tensor, label: str) -> float:
        return sum(
            float(probs[i])
            for i, t in enumerate(self.text)
            if t.replace("▁", " ").replace("Ġ", " ").strip() == label
        )

    def p_first(self, prompt: str, chat: bool = False) -> float:
        probs = self.next_probs(self.ids(prompt, chat))
        p1, p2 = self.label_prob(probs, "1"), self.label_prob(probs, "2")
        return p1 / (p1 + p2)

    def score(self, prompt: str, chat: bool = False) -> tuple[float, float]:
        """(expected 1-10 score, score in [-1, 1]); "10" split as "1" + "0" on completions."""
        probs = self.next_probs(self.ids(prompt, chat))
        p = {i: self.label_prob(probs, str(i)) for i in range(1, 11)}
        assert p[10] == 0.0  # both tiny tokenizers split "10", so the split path is exercised
        if not chat:
            one = max((i for i, t in enumerate(self.text) if t.strip() == "1"), key=lambda i: float(probs[i]))
            after = self.next_probs(self.ids(prompt + self.text[one]))
            p_zero = sum(float(after[i]) for i, t in enumerate(self.text) if t == "0")
            p[10], p[1] = p[1] * p_zero, p[1] * (1 - p_zero)
        expected = sum(i * q for i, q in p.items()) / sum(p.values())
        return expected, expected_score_to_unit(expected)

    @torch.no_grad()
    def greedy(self, prompt: str, max_tokens: int) -> str:
        ids = self.ids(prompt)
        out: list[int] = []
        for _ in range(max_tokens):  # no KV cache: independent of the server's decoding loop
            token = int(torch.argmax(self.model(input_ids=torch.tensor([ids + out])).logits[0, -1]))
            out.append(token)
            if token == self.tokenizer.eos_token_id:
                break
        return self.tokenizer.decode(out, skip_special_tokens=True)


def pair_prompt(pair: OrderedPair, rationale: str | None = None) -> str:
    return render_pairwise(TEMPLATES.pairwise, pair.prompt, pair.first, pair.second, rationale)


def score_prompt(context: str, response: str) -> str:
    return TEMPLATES.score.prefix() + TEMPLATES.score.suffix(context, response)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2_lm(tiny_gpt2: Path) -> LocalLM:
    return LocalLM(tiny_gpt2, name="tiny-gpt2")


@pytest.fixture(scope="module")
def llama_lm(tiny_llama: Path) -> LocalLM:
    return LocalLM(tiny_llama, name="tiny-llama")


@pytest.fixture(scope="module")
def gpt2_direct(tiny_gpt2: Path) -> Direct:
    return Direct(tiny_gpt2)


@pytest.fixture(scope="module")
def llama_direct(tiny_llama: Path) -> Direct:
    return Direct(tiny_llama)


@pytest.fixture
def server(gpt2_lm: LocalLM) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(gpt2_lm) as s:
        yield s


@pytest.fixture
def server_b(gpt2_lm: LocalLM) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(gpt2_lm) as s:
        yield s


@pytest.fixture
def make_judge() -> Iterator[Callable[..., OpenAIJudge]]:
    judges: list[OpenAIJudge] = []

    def make(*servers: OpenAITestServer | str, **settings: Any) -> OpenAIJudge:
        urls = [s if isinstance(s, str) else s.url for s in servers]
        defaults: dict[str, Any] = {
            "model": "tiny-gpt2",
            "top_logprobs": 1024,
            "api_key_env": None,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "timeout_s": 10.0,
        }
        judge = OpenAIJudge(OpenAIJudgeConfig(base_urls=urls, **{**defaults, **settings}))
        judges.append(judge)
        return judge

    yield make
    for judge in judges:
        judge.close()


# ---------------------------------------------------------------- numbers over HTTP


def test_completions_soft_label_equals_transformers(server, make_judge, gpt2_direct) -> None:
    judge = make_judge(server)
    got = [j.p_first for j in judge.judge_orders(PAIRS)]
    want = [gpt2_direct.p_first(pair_prompt(p)) for p in PAIRS]
    assert got == pytest.approx(want, abs=1e-4)
    assert max(got) - min(got) > 1e-3  # the pairs really differ: a constant could not pass
    body = server.posts()[0].body
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] == 1024
    assert body["prompt"].endswith("Preferred Response=")
    assert server.posts()[0].path == "/v1/completions"


def test_chat_endpoint_with_chat_template(llama_lm, make_judge, llama_direct) -> None:
    with OpenAITestServer(llama_lm) as server:
        judge = make_judge(server, model="tiny-llama", endpoint="chat")
        got = [j.p_first for j in judge.judge_orders(PAIRS)]
        want = [llama_direct.p_first(pair_prompt(p), chat=True) for p in PAIRS]
        assert got == pytest.approx(want, abs=1e-4)
        body = server.posts()[0].body
        assert server.posts()[0].path == "/v1/chat/completions"
        sent = sorted(json.dumps(r.body["messages"]) for r in server.posts())  # arrival order varies
        assert sent == sorted(json.dumps([{"role": "user", "content": pair_prompt(p)}]) for p in PAIRS)
        assert body["logprobs"] is True and body["top_logprobs"] == 1024 and body["max_tokens"] == 1
        # Chat reads "10" only when it is one token: no second completion is asked for ("10" has no
        # single token: the tokenize endpoint, asked once, says so, and no logit_bias is sent).
        server.reset()
        (score,) = judge.score_responses([("Hi", "Hello! How can I help?")])
        expected, unit = llama_direct.score(score_prompt("Hi", "Hello! How can I help?"), chat=True)
        assert score.expected == pytest.approx(expected, abs=1e-4)
        assert score.score == pytest.approx(unit, abs=1e-4)
        assert len([r for r in server.posts() if r.path == "/v1/chat/completions"]) == 1


def test_compare_averages_both_orders(server, make_judge, gpt2_direct) -> None:
    judge = make_judge(server)
    pair = PAIRS[0]
    result = judge.compare(pair.prompt, pair.first, pair.second)
    ab = gpt2_direct.p_first(pair_prompt(pair))
    ba = gpt2_direct.p_first(pair_prompt(OrderedPair(pair.prompt, pair.second, pair.first)))
    assert result.p_a_ab == pytest.approx(ab, abs=1e-4)
    assert result.p_a_ba == pytest.approx(1 - ba, abs=1e-4)
    assert result.p_a == pytest.approx((ab + 1 - ba) / 2, abs=1e-4)
    assert len(server.posts()) == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_direct_score_splits_ten(arch, request, make_judge) -> None:
    lm: LocalLM = request.getfixturevalue(f"{arch}_lm")
    direct: Direct = request.getfixturevalue(f"{arch}_direct")
    items = [("Hi", "Hello! How can I help?"), ("What is 2+2?", "5, probably.")]
    with OpenAITestServer(lm) as server:
        judge = make_judge(server, model=lm.name)
        got = judge.score_responses(items)
        for (context, response), score in zip(items, got, strict=True):
            expected, unit = direct.score(score_prompt(context, response))
            assert score.expected == pytest.approx(expected, abs=1e-4)
            assert score.score == pytest.approx(unit, abs=1e-4)
            assert -1.0 <= score.score <= 1.0
        prompts = [r.body["prompt"] for r in server.posts() if r.path == "/v1/completions"]
        assert len(prompts) == 4  # one read of the score token, one of P("0" | "1"), per item
        assert sum(p.endswith("SCORE: ") for p in prompts) == 2


# ---------------------------------------------------------------- faults and retries


@pytest.mark.parametrize(
    "fault",
    [
        "429",
        "500",
        "503",
        "slow",
        "garbled",
        "nologprobs",
        "drop",
        "nan",
        "inf",
        "-inf",
        "positive",
        "overfull",
    ],
)
def test_fault_is_retried_and_answer_unchanged(fault, server, make_judge) -> None:
    judge = make_judge(server, timeout_s=1.0)
    server.slow_s = 1.5  # past the client's timeout
    clean = judge.judge_orders(PAIRS[:1])[0].p_first
    server.reset()
    server.add_faults(fault)
    again = judge.judge_orders(PAIRS[:1])[0].p_first
    assert again == clean
    assert len(server.posts()) == 2
    stats = judge.stats()
    assert stats["retries"] == 1 and stats["failures"] == 1 and stats["requests"] == 3


def test_retry_after_is_honoured_and_capped(server, make_judge) -> None:
    judge = make_judge(server, backoff_max_s=5.0)
    server.retry_after = "0.4"
    server.add_faults("429")
    start = time.monotonic()
    judge.judge_orders(PAIRS[:1])
    assert time.monotonic() - start >= 0.4
    capped = make_judge(server, backoff_max_s=0.05)
    server.retry_after = "30"
    server.add_faults("429")
    start = time.monotonic()
    capped.judge_orders(PAIRS[1:2])
    assert time.monotonic() - start < 5.0


def test_client_error_is_not_retried(server, make_judge) -> None:
    judge = make_judge(server)
    server.error_message = "top_logprobs must be <= 20"
    server.add_faults("400")
    with pytest.raises(JudgeError) as err:
        judge.judge_orders(PAIRS[:1])
    message = str(err.value)
    assert "HTTP 400" in message and "top_logprobs must be <= 20" in message and server.url in message
    assert "\n" not in message
    assert len(server.posts()) == 1

    wrong = make_judge(server, model="no-such-model")
    with pytest.raises(JudgeError, match=r"HTTP 404: The model `no-such-model` does not exist.*check model="):
        wrong.judge_orders(PAIRS[:1])


@pytest.mark.parametrize("fault", ["nan", "inf", "-inf", "positive", "overfull"])
def test_unusable_logprobs_give_no_row_no_cache_entry_and_one_line(
    fault: str, server: OpenAITestServer, tmp_path: Path, capsys
) -> None:
    """A server that keeps sending log-probs that are no probabilities (NaN, ±inf, p > 1, or
    summing past 1): each reply is retried, then the job stops with one line; nothing is written
    to the output or the cache, so a re-run asks again instead of serving a poisoned label."""
    from openrlaif.cli import main

    judge = tmp_path / "judge.yaml"
    judge.write_text(
        f"backend: openai\nmodel: tiny-gpt2\nbase_urls: ['{server.url}']\napi_key_env: null\n"
        "top_logprobs: 1024\nmax_retries: 2\nbackoff_base_s: 0.01\nbackoff_max_s: 0.02\n"
    )
    pairs = _pairs_jsonl(tmp_path / "pairs.jsonl")
    out, cache = tmp_path / "labeled.jsonl", tmp_path / "cache.sqlite3"
    server.fail_all = fault
    args = ["label", "--pairs", str(pairs), "--judge", str(judge), "--out", str(out), "--cache", str(cache)]
    assert main([*args, "--quiet"]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "3 attempt(s)" in error and "unusable reply" in error
    assert len(server.posts()) >= 3  # retried before giving up
    assert not out.exists() or out.read_text() == ""
    assert JudgmentCache(cache).get_many([]) == {} and len(JudgmentCache(cache)) == 0

    server.fail_all = None  # the server is fixed: the same command labels every pair
    assert main([*args, "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PAIRS) and all(0.0 < r["p_a"] < 1.0 for r in rows)


def test_unusable_score_logprobs_are_refused_on_the_chat_endpoint(llama_lm, make_judge) -> None:
    with OpenAITestServer(llama_lm) as server:
        judge = make_judge(server, model="tiny-llama", endpoint="chat", max_retries=1)
        server.fail_all = "nan"
        with pytest.raises(JudgeError, match=r"2 attempt\(s\).*log-prob of token .* is nan"):
            judge.score_responses([("Hi", "Hello!")])


def test_exhausted_retries_name_the_url(server, make_judge) -> None:
    judge = make_judge(server, max_retries=2)
    server.fail_all = "503"
    with pytest.raises(JudgeError) as err:
        judge.judge_orders(PAIRS[:1])
    message = str(err.value)
    assert server.url in message and "3 attempt" in message and "HTTP 503" in message
    assert "\n" not in message
    assert len(server.posts()) == 3


def test_labels_missing_from_top_tokens() -> None:
    top = [("Ġ1", math.log(0.5)), ("x", math.log(0.2)), ("y", math.log(0.1))]
    # "2" is not returned: bounded by the smallest returned probability (0.1).
    found = label_logprobs(top, ("1", "2"))
    assert bounded_soft_label(found, top, ("1", "2")) == pytest.approx(0.5 / 0.6)
    both = [(" 1", math.log(0.3)), ("▁1", math.log(0.1)), ("1", math.log(0.1)), ("2", math.log(0.25))]
    assert label_logprobs(both, ("1", "2"))["1"] == pytest.approx(math.log(0.5))
    assert bounded_soft_label(label_logprobs(both, ("1", "2")), both, ("1", "2")) == pytest.approx(0.5 / 0.75)


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("ids_from", ["tokenize", "tokenizer"])
def test_labels_outside_the_top_tokens_are_read_exactly_with_logit_bias(
    mode, ids_from, server, make_judge, gpt2_direct, tiny_gpt2
) -> None:
    """top_logprobs 2: the labels are rarely among them. Each missing label's tokens are asked for
    with a logit_bias; the soft labels are the model's own (all of its tokens' probabilities), as
    with every token returned. The server returns the model's log-probs ("raw": llama.cpp, vLLM's
    default) or the biased ones ("processed"); the ids come from /tokenize or the `tokenizer`."""
    server.logprobs_mode = mode
    settings: dict[str, Any] = {"top_logprobs": 2}
    if ids_from == "tokenizer":
        server.tokenize = False
        settings["tokenizer"] = str(tiny_gpt2)
    judge = make_judge(server, **settings)
    got = [j.p_first for j in judge.judge_orders(PAIRS)]
    want = [gpt2_direct.p_first(pair_prompt(p)) for p in PAIRS]
    assert got == pytest.approx(want, abs=1e-4)
    assert judge.stats()["biased_reads"] > 0  # the labels really were outside the top 2
    biased = [
        r.body["logit_bias"] for r in server.posts() if r.path == "/v1/completions" and "logit_bias" in r.body
    ]
    assert biased and all(set(b.values()) == {100} for b in biased)
    if mode == "processed":  # recognised: both labels' tokens in one request, the same bias
        assert any(len(b) > 2 for b in biased)
    tokenize_calls = [r for r in server.posts() if r.path == "/tokenize"]
    assert bool(tokenize_calls) == (ids_from == "tokenize")
    # one search for the ids, shared by the judgments running at once: each text tokenized once
    assert len(tokenize_calls) == len({json.dumps(r.body) for r in tokenize_calls})


def test_labels_that_cannot_be_read_are_undecided_never_cached_and_widened_when_asked(
    server, make_judge, gpt2_direct, tmp_path
) -> None:
    """A server that ignores logit_bias, or labels whose ids are unknown: a judgment with neither
    label among the top tokens is undecided (NaN, the reason, counted, not cached; compare_many
    refuses it in one line); one label among them bounds the other by the last token (as before);
    fallback_top_logprobs asks again for more tokens, here the whole vocabulary: exact."""
    from openrlaif.judges.cache import JudgmentCache

    server.ignore_logit_bias = True
    judge = make_judge(server, top_logprobs=2)
    judge.cache = JudgmentCache(tmp_path / "cache.sqlite3")
    judged = judge.orders(PAIRS)
    undecided = [j for j in judged if j.undecided]
    assert undecided and all(math.isnan(j.p_first) for j in undecided)
    assert all("ignores logit_bias" in j.undecided for j in undecided)
    assert judge.stats()["undecided"] == len(undecided)
    assert all(0.0 < j.p_first < 1.0 for j in judged if not j.undecided)
    assert len(judge.cache) == len(PAIRS) - len(undecided)  # an undecided judgment is asked again
    with pytest.raises(JudgeError) as error:
        judge.compare_many([(p.prompt, p.first, p.second) for p in PAIRS])
    assert "could not read its labels for" in str(error.value) and "\n" not in str(error.value)
    assert "ignores logit_bias" in str(error.value)

    judge = make_judge(server, top_logprobs=2, fallback_top_logprobs=1024)
    got = judge.judge_orders(PAIRS)
    assert [j.p_first for j in got] == pytest.approx(
        [gpt2_direct.p_first(pair_prompt(p)) for p in PAIRS], abs=1e-4
    )
    assert judge.stats()["widened_reads"] > 0 and judge.stats()["undecided"] == 0
    assert any(r.body.get("logprobs") == 1024 for r in server.posts() if r.path == "/v1/completions")

    # no tokenize endpoint and no `tokenizer`: the labels' ids are unknown, no logit_bias is sent
    server.reset()
    server.tokenize = False
    judge = make_judge(server, top_logprobs=2)
    got = judge.judge_orders(PAIRS)
    assert any("their token ids are unknown" in (j.undecided or "") for j in got)
    assert judge.stats()["bounded_reads"] + judge.stats()["undecided"] > 0
    assert not any("logit_bias" in (r.body or {}) for r in server.posts())
    judge = make_judge(server, top_logprobs=2, label_bias="off")  # off: never asks for the ids
    server.reset()
    server.tokenize = True
    assert any("label_bias is off" in (j.undecided or "") for j in judge.judge_orders(PAIRS))
    assert not [r for r in server.posts() if r.path == "/tokenize"]


def test_fallback_top_logprobs_must_be_wider() -> None:
    from openrlaif.config import OpenAIJudgeConfig

    with pytest.raises(
        ValueError, match=r"fallback_top_logprobs \(20\) must be more than top_logprobs \(20\)"
    ):
        OpenAIJudgeConfig(model="m", fallback_top_logprobs=20)


def test_direct_scores_outside_the_top_tokens_are_read_with_logit_bias(
    server, make_judge, gpt2_direct
) -> None:
    """top_logprobs 2: the score tokens are rarely among them; each missing one is read with a
    logit_bias on its tokens, "10" still split by P("0" | "1"): the expected score is the model's."""
    judge = make_judge(server, top_logprobs=2, fallback_top_logprobs=1024)
    items = [("Hi", "Hello!"), ("How do I pick a lock?", "I can't help with that.")]
    got = judge.score_responses(items)
    want = [gpt2_direct.score(score_prompt(c, r)) for c, r in items]
    assert [g.expected for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert judge.stats()["biased_reads"] == len(items) and judge.stats()["widened_reads"] == 0
    server.reset()
    server.ignore_logit_bias = True
    judge = make_judge(server, top_logprobs=2)
    scored = judge.score_responses(items)
    assert [s.undecided is not None for s in scored] == [True, True]  # no score token in either top 2
    assert all("ignores logit_bias" in (s.undecided or "") and math.isnan(s.score) for s in scored)
    assert judge.stats()["undecided"] == 2


def test_a_server_that_serves_one_request_at_a_time_is_noticed_and_advice_given(
    server, make_judge, capsys
) -> None:
    """Requests queue on the server: with concurrency 4 those behind the first time out while it is
    answered. The judge says once what to set, and the error says it again when retries run out."""
    server.one_at_a_time, server.delay_s = True, 0.4
    judge = make_judge(server, concurrency=4, timeout_s=0.6, max_retries=0)
    with pytest.raises(JudgeError) as error:
        judge.judge_orders(PAIRS)
    assert "answered other requests meanwhile: it seems to serve one request at a time" in str(error.value)
    assert "Set concurrency: 1 per such server" in str(error.value)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "seems to serve one request at a time" in warnings[0]
    # concurrency 1, as advised: every request answered
    server.reset()
    server.one_at_a_time, server.delay_s = True, 0.05
    judge = make_judge(server, concurrency=1, timeout_s=5.0, max_retries=0)
    assert len(judge.judge_orders(PAIRS)) == len(PAIRS)
    assert "warning:" not in capsys.readouterr().err


# ---------------------------------------------------------------- fleet


def test_fleet_spreads_requests(server, server_b, make_judge, gpt2_direct) -> None:
    judge = make_judge(server, server_b, concurrency=4)
    pairs = [OrderedPair(f"Question {i}?", f"Answer {i}.", "No.") for i in range(16)]
    got = [j.p_first for j in judge.judge_orders(pairs)]
    assert got[:3] == pytest.approx([gpt2_direct.p_first(pair_prompt(p)) for p in pairs[:3]], abs=1e-4)
    a, b = len(server.posts()), len(server_b.posts())
    assert a + b == 16 and a >= 4 and b >= 4
    assert judge.stats()["servers"][server.url]["requests"] == a


@pytest.mark.parametrize("death", ["503", "drop", "stopped"])
def test_dead_member_is_routed_around(death, server, gpt2_lm, make_judge) -> None:
    baseline = [j.p_first for j in make_judge(server).judge_orders(PAIRS)]
    server.reset()
    dead = OpenAITestServer(gpt2_lm).start()
    if death == "stopped":
        dead.stop()  # nothing listens on its port any more: connection refused
    else:
        dead.fail_all = death
    try:
        judge = make_judge(dead.url, server, max_retries=1, concurrency=2)  # a retry must go elsewhere
        pairs = PAIRS * 4
        got = [j.p_first for j in judge.judge_orders(pairs)]
        assert got == baseline * 4
        assert judge.stats()["servers"][dead.url]["failures"] >= 1
        if death != "stopped":
            assert len(dead.posts()) >= 1
    finally:
        if death != "stopped":
            dead.stop()


# ---------------------------------------------------------------- the API key


def test_api_key_sent_and_never_stored(server, make_judge, monkeypatch, tmp_path) -> None:
    key = "sk-test-Very-Secret-4242"
    monkeypatch.setenv("MY_JUDGE_KEY", key)
    cache = JudgmentCache(tmp_path / "cache" / "judgments.sqlite3")
    judge = make_judge(server, api_key_env="MY_JUDGE_KEY", max_retries=1)
    judge.cache = cache
    judge.compare(PAIRS[0].prompt, PAIRS[0].first, PAIRS[0].second)
    judge.score(PAIRS[0].prompt, PAIRS[0].first)
    assert len(cache) == 3
    assert server.posts() and all(r.headers.get("authorization") == f"Bearer {key}" for r in server.posts())

    for kind in ("pair", "score"):
        assert key not in json.dumps(judge.fingerprint(kind)) and key not in json.dumps(
            judge.identity(kind).to_dict()
        )

    server.error_message = f"invalid api key {key}"  # a server that echoes the key back
    server.add_faults("400")
    with pytest.raises(JudgeError) as err:
        judge.judge_orders(PAIRS[1:2])
    assert key not in str(err.value) and "***" in str(err.value)
    server.error_message = "x" * 190 + key  # scrubbed before the message is cut short
    server.add_faults("400")
    with pytest.raises(JudgeError) as err:
        judge.judge_orders(PAIRS[1:2])
    assert key[:8] not in str(err.value)
    server.fail_all = "500"
    with pytest.raises(JudgeError) as err:
        judge.judge_orders(PAIRS[2:3])
    assert key not in str(err.value)
    server.fail_all = None

    cache.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "cache").iterdir())
    assert b"p_first" in stored  # the judgments are there, the key is not
    assert key.encode() not in stored

    monkeypatch.delenv("MY_JUDGE_KEY")
    server.reset()
    judge.cache = None
    judge.judge_orders(PAIRS[:1])
    assert "authorization" not in server.posts()[0].headers  # local vLLM needs none


# ---------------------------------------------------------------- concurrency and event loops


def test_concurrency_is_bounded(server, make_judge) -> None:
    judge = make_judge(server, concurrency=3)
    server.delay_s = 0.05  # requests overlap long enough to be counted
    pairs = [OrderedPair(f"Q{i}", "yes", "no") for i in range(12)]
    judge.judge_orders(pairs)
    assert 2 <= server.max_in_flight <= 3
    assert len(server.posts()) == 12


def test_sync_api_works_inside_a_running_loop_and_threads(server, make_judge) -> None:
    judge = make_judge(server)
    want = judge.judge_orders(PAIRS[:1])[0].p_first

    async def inside_loop() -> float:
        return judge.judge_orders(PAIRS[:1])[0].p_first

    assert asyncio.run(inside_loop()) == want
    results: list[float] = []
    threads = [
        threading.Thread(target=lambda: results.append(judge.judge_orders(PAIRS[:1])[0].p_first))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 3
    judge.close()
    assert judge.judge_orders(PAIRS[:1])[0].p_first == want  # reopens after close()


# ---------------------------------------------------------------- chain of thought


def test_cot_greedy_rationale(server, make_judge, gpt2_direct) -> None:
    judge = make_judge(server, cot=True, max_rationale_tokens=8)
    pair = PAIRS[1]
    (got,) = judge.judge_orders([pair])
    step1 = TEMPLATES.pairwise.prefix() + TEMPLATES.pairwise.cot_suffix(pair.prompt, pair.first, pair.second)
    rationale = gpt2_direct.greedy(step1, 8)
    assert got.rationales == [rationale.strip()] and rationale.strip()
    assert got.p_first == pytest.approx(gpt2_direct.p_first(pair_prompt(pair, rationale)), abs=1e-4)
    first, second = server.posts()
    assert first.body["temperature"] == 0 and first.body["max_tokens"] == 8 and first.body["prompt"] == step1


def test_cot_self_consistency(server, make_judge, gpt2_direct) -> None:
    judge = make_judge(server, cot=True, self_consistency=3, temperature=1.0, seed=7, max_rationale_tokens=8)
    pair = PAIRS[0]
    (got,) = judge.judge_orders([pair])
    assert len(got.rationales) == 3 and len(set(got.rationales)) > 1
    each = [gpt2_direct.p_first(pair_prompt(pair, r)) for r in got.rationales]
    assert got.p_first == pytest.approx(sum(each) / 3, abs=1e-4)
    samples = [r.body for r in server.posts() if r.body["max_tokens"] == 8]
    assert sorted(b["seed"] for b in samples) == [7, 8, 9] and all(b["temperature"] == 1.0 for b in samples)
    assert judge.judge_orders([pair])[0].rationales == got.rationales  # seeded: reproducible


# ---------------------------------------------------------------- identity


def test_fingerprint_holds_answers_not_transport(server, server_b, make_judge) -> None:
    one = make_judge(server)
    other = make_judge(server_b, server, concurrency=2, timeout_s=3.0, max_retries=1, api_key_env="X")
    for kind in ("pair", "score"):
        assert one.fingerprint(kind) == other.fingerprint(kind)
    fp = one.fingerprint("pair")
    assert fp["template_hash"] == TEMPLATES.pairwise.hash() == one.template_hash("pair")
    assert one.identity("score").template_hash == TEMPLATES.score.hash()
    assert {"model", "endpoint", "top_logprobs", "cot", "seed"} <= set(fp) and "base_urls" not in fp
    assert make_judge(server, top_logprobs=20).fingerprint("pair") != fp
    assert make_judge(server, cot=True).fingerprint("pair") != fp
    assert make_judge(server, cot=True).fingerprint("score") == one.fingerprint("score")


# ---------------------------------------------------------------- through the command line


def test_label_command_with_an_http_judge_fleet(server, server_b, tmp_path: Path, capsys) -> None:
    """`openrlaif label --judge fleet.yaml`: a YAML judge pointing at two servers, one of which
    answers its first requests with faults; every pair is labeled, the counters are reported."""
    import json

    from openrlaif.cli import main

    judge_file = tmp_path / "fleet.yaml"
    judge_file.write_text(
        f"backend: openai\nmodel: tiny-gpt2\nbase_urls: ['{server.url}', '{server_b.url}']\n"
        "api_key_env: null\ntop_logprobs: 1024\nbackoff_base_s: 0.01\nbackoff_max_s: 0.05\ntimeout_s: 10\n"
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "response_a": p.first, "response_b": p.second}) + "\n"
            for p in PAIRS
        )
    )
    server.faults.extend(["500", "garbled", "429"])
    out = tmp_path / "labeled.jsonl"
    assert (
        main(["label", "--pairs", str(pairs), "--judge", str(judge_file), "--out", str(out), "--quiet"]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PAIRS)
    assert all(0.0 < r["p_a"] < 1.0 and r["judge"]["backend"] == "openai" for r in rows)
    printed = capsys.readouterr().out
    assert f"{server.url}: " in printed and f"{server_b.url}: " in printed
    assert sum(int(n) for n in __import__("re").findall(r"(\d+) retries", printed)) == 3


MORE_PAIRS = PAIRS + [
    OrderedPair(
        f"Question {i}: what should I do about my {thing}?", f"Look after your {thing}.", "Ignore it."
    )
    for i, thing in enumerate(["cough", "car", "garden", "debt", "cat"])
]


def test_label_lists_undecided_pairs_apart_and_asks_for_them_again(
    server, server_b, tmp_path: Path, capsys
) -> None:
    """A server that ignores logit_bias at top_logprobs 40 (of the tiny model's 1,024 tokens; the
    labels of 3 of these 8 pairs are among them): `openrlaif label` runs to the end, the
    pairs it could not read are in <out>.undecided.jsonl with the reason (not in the labels, not
    in the cache), one warning line counts them. Run again with a server that honours the bias:
    only those are asked again, the list goes, every pair is labeled once. Shards merge the same
    way: their undecided pairs are not "missing", they are listed beside the merged file."""
    from openrlaif.cli import main

    server.ignore_logit_bias = True
    judge_file = tmp_path / "judge.yaml"
    judge_file.write_text(
        f"backend: openai\nmodel: tiny-gpt2\nbase_urls: ['{server.url}']\napi_key_env: null\n"
        "top_logprobs: 40\nbackoff_base_s: 0.01\ntimeout_s: 10\n"
    )
    pairs = _pairs_jsonl(tmp_path / "pairs.jsonl", MORE_PAIRS)
    out, cache = tmp_path / "labeled.jsonl", tmp_path / "cache.sqlite3"
    label = ["label", "--pairs", str(pairs), "--judge", str(judge_file), "--cache", str(cache), "--quiet"]
    assert main([*label, "--out", str(out)]) == 0
    listed = [
        json.loads(line) for line in (tmp_path / "labeled.jsonl.undecided.jsonl").read_text().splitlines()
    ]
    labeled = [json.loads(line) for line in out.read_text().splitlines()]
    assert (len(listed), len(labeled)) == (5, 3)
    assert {r["id"] for r in listed}.isdisjoint(r["id"] for r in labeled)
    assert all("ignores logit_bias" in r["undecided"] and r["judge"]["backend"] == "openai" for r in listed)
    assert all(0.0 < r["p_a"] < 1.0 for r in labeled)
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if "undecided" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {len(listed)} row(s) undecided")
    readings = re.search(r"top tokens: .*?(\d+) undecided", printed.out)  # one per order judged
    assert readings is not None and int(readings.group(1)) >= len(listed)

    # shards: each part lists its own; the merge accounts for them and lists them together
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        assert main([*label, "--out", str(part), "--shard", f"{i}/2"]) == 0
    merged = tmp_path / "merged.jsonl"
    assert main(["merge", "labels", str(merged), *map(str, parts), "--pairs", str(pairs)]) == 0
    merged_list = [
        json.loads(line) for line in (tmp_path / "merged.jsonl.undecided.jsonl").read_text().splitlines()
    ]
    assert sorted(r["id"] for r in merged_list) == sorted(r["id"] for r in listed)
    assert len(merged.read_text().splitlines()) == len(labeled)
    assert f"warning: {len(listed)} row(s) undecided" in capsys.readouterr().err

    # align: the alignment is over the decided pairs; the undecided ones are counted and listed
    align = tmp_path / "align.json"
    argv = ["align", "--dataset", str(pairs), "--judge", str(judge_file), "--out", str(align), "--quiet"]
    assert main([*argv, "--cache", str(cache)]) == 0
    metrics = json.loads(align.read_text())
    assert (metrics["pairs"], metrics["job"]["undecided"]) == (3, 5)
    assert metrics["job"]["readings"]["undecided"] >= 5
    printed = capsys.readouterr()
    assert "top tokens: " in printed.out and "warning: 5 row(s) undecided" in printed.err
    assert (tmp_path / "align.labels.jsonl.undecided.jsonl").exists()

    server.ignore_logit_bias = False
    server.reset()
    assert main([*label, "--out", str(out)]) == 0
    labeled_again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in labeled_again) == sorted(f"p{i}" for i in range(len(MORE_PAIRS)))
    assert not (tmp_path / "labeled.jsonl.undecided.jsonl").exists()
    asked = {r.body["prompt"] for r in server.posts() if r.path == "/v1/completions"}
    assert len(asked) == 2 * len(listed)  # both orders of the undecided pairs, nothing else
    assert "undecided" not in capsys.readouterr().err


def test_an_ensemble_member_that_cannot_read_its_labels_leaves_the_judgment_undecided(
    server, server_b, make_judge
) -> None:
    from openrlaif.config import EnsembleJudgeConfig
    from openrlaif.judges.ensemble import EnsembleJudge

    server.ignore_logit_bias = True
    members = [make_judge(server, top_logprobs=2), make_judge(server_b)]
    ensemble = EnsembleJudge(EnsembleJudgeConfig(judges=[m.config for m in members]), members)
    judged = ensemble.orders(PAIRS)
    first = members[0].orders(PAIRS)
    assert [j.undecided is not None for j in judged] == [j.undecided is not None for j in first]
    assert any(j.undecided for j in judged) and all(math.isnan(j.p_first) for j in judged if j.undecided)
    assert all("tiny-gpt2: " in j.undecided for j in judged if j.undecided)


# ---------------------------------------------------------------- an echoed key, end to end

# Every 4-character piece of this key holds a letter outside hex digits (so no hash in the cache can
# contain one) and none is an English word: a piece found in a file can only be the key leaking.
SECRET = "sk-Zq8Wv3Xj7Kp2Ty9R"


def _key_pieces(key: str) -> set[str]:
    return {key[i : i + 4] for i in range(len(key) - 3)}


def _leaks(text: str | bytes, key: str = SECRET) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return sorted(p for p in _key_pieces(key) if p.encode() in data)


def _judge_yaml(path: Path, *servers: OpenAITestServer) -> Path:
    urls = ", ".join(f"'{s.url}'" for s in servers)
    path.write_text(
        f"backend: openai\nmodel: tiny-gpt2\nbase_urls: [{urls}]\napi_key_env: MY_JUDGE_KEY\n"
        "top_logprobs: 1024\nmax_retries: 1\nbackoff_base_s: 0.01\nbackoff_max_s: 0.02\ntimeout_s: 10\n"
    )
    return path


def _pairs_jsonl(path: Path, pairs: list[OrderedPair] = PAIRS) -> Path:
    rows = [
        {"id": f"p{i}", "prompt": p.prompt, "response_a": p.first, "response_b": p.second, "human_label": 1.0}
        for i, p in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_redact_masks_the_key_and_every_piece_of_it() -> None:
    from openrlaif.redaction import redact

    partly_masked = f"Incorrect API key provided: {SECRET[:8]}*****{SECRET[-4:]}."
    assert redact(partly_masked, SECRET) == "Incorrect API key provided: ***********."
    assert redact(f"key={SECRET}!", SECRET) == "key=***!"
    assert redact("Bearer " + SECRET[5:12] + " x", SECRET) == "Bearer *** x"
    assert redact("nothing here, sk- only", SECRET) == "nothing here, sk- only"  # 3 characters say nothing
    assert redact("abc", None) == "abc" and redact("xx ab xx", "ab") == "xx *** xx"


@pytest.mark.parametrize("fault", ["401", "500"])
def test_a_key_echoed_by_the_server_appears_nowhere(
    fault: str, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A server echoes the key (whole, and partly masked as OpenAI does) in its error bodies: not one
    4-character piece of it reaches the console or any file the runs wrote (outputs, cache)."""
    from openrlaif.cli import main

    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    judge = _judge_yaml(tmp_path / "judge.yaml", server)
    pairs = _pairs_jsonl(tmp_path / "pairs.jsonl")
    cache = tmp_path / "cache" / "judgments.sqlite3"
    label = ["label", "--pairs", str(pairs), "--judge", str(judge), "--cache", str(cache), "--quiet"]
    assert main([*label, "--out", str(tmp_path / "ok.jsonl")]) == 0
    assert server.posts()[0].headers["authorization"] == f"Bearer {SECRET}"  # the key was really sent

    server.error_message = f"Incorrect API key provided: {SECRET[:8]}*****{SECRET[-4:]} (you sent {SECRET})"
    server.fail_all = fault
    assert main([*label, "--out", str(tmp_path / "failed.jsonl"), "--no-cache"]) == 2
    console = capsys.readouterr()
    # the in-process server's model may warn on stderr too; the command's error is one line of its own
    (error,) = [line for line in console.err.splitlines() if line.startswith("error: ")]
    assert f"HTTP {fault}" in error and "***" in error
    assert _leaks(console.out + console.err) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "judgments.sqlite3" for p in written) and (tmp_path / "ok.jsonl").exists()
    assert {str(p.relative_to(tmp_path)): _leaks(p.read_bytes()) for p in written} == {
        str(p.relative_to(tmp_path)): [] for p in written
    }


def test_a_key_echoed_into_a_pipeline_run_stays_out_of_its_manifest_and_report(
    server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from openrlaif.cli import main

    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    run_dir = tmp_path / "run"
    experiment = tmp_path / "experiment.yaml"
    config = {
        "name": "echo", "run_dir": str(run_dir), "model": "tiny:gpt2", "policies": {},
        "judge": str(_judge_yaml(tmp_path / "judge.yaml", server)),
        "align": {"dataset": str(_pairs_jsonl(tmp_path / "pairs.jsonl"))},
    }  # fmt: skip
    experiment.write_text(json.dumps(config))
    server.error_message = f"bad key {SECRET[:8]}*****{SECRET[-4:]}"
    server.fail_all = "401"
    assert main(["run", str(experiment), "--quiet"]) == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["align"]["status"] == "failed" and "***" in manifest["stages"]["align"]["error"]
    assert main(["report", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "report.html").exists()
    console = capsys.readouterr()
    assert _leaks(console.out + console.err) == []
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert _leaks(path.read_bytes()) == [], path


def test_a_constitution_reaches_the_server_prompt(server, make_judge) -> None:
    judge = make_judge(
        server, principles=["Prefer the response that says please."], principles_per_judgment=1
    )
    judge.judge_orders(PAIRS[:1])
    prompts = [r.body["prompt"] for r in server.posts() if r.path == "/v1/completions"]
    assert prompts and all(
        "weigh these principles:\n- Prefer the response that says please.\n" in p for p in prompts
    )
