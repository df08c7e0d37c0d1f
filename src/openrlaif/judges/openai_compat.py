"""A judge behind an OpenAI-compatible server: vLLM, SGLang, llama.cpp server or OpenAI itself.

The prompts are the local judge's (the template set named by `config.template`); the server
returns the top log-probabilities of the next token and the judge reads the labels from them:

- pairwise: P(first preferred) = softmax over the two labels' probabilities, where a label's
  probability sums every returned token whose text, stripped of whitespace and of the
  SentencePiece "▁" / byte-level "Ġ" markers, is the label (so "1", " 1" and "▁1" all count);
- d-RLAIF score: P(i), i = 1..10, renormalised over the ten; expected score Σ i·P(i), rescaled
  to [-1, 1];
- chain of thought: a rationale is generated first (greedy, or `self_consistency` samples at
  `temperature` with seeds `seed + i`), then the labels are read after it; samples are averaged.
- a label missing from the returned top tokens (a base model's next token is rarely a label, and
  OpenAI caps top_logprobs at 20) is asked for again, once per token that spells it, with a
  `logit_bias` of +100 on that token: the greedy answer is then that token, and the server returns
  its log-prob; the label's is their sum. Servers differ in which log-prob that is
  (`biased_label_logprob`): the model's own (llama.cpp's server, vLLM's default raw log-probs) is
  used as it is; one with the bias applied (vLLM `--logprobs-mode processed_logprobs`) is
  recognised (the token comes back with probability ~1) and every label's tokens are then asked for
  in one request with the same bias, which leaves their ratios as they were. The tokens' ids come
  from the `tokenizer` setting or the server's tokenize endpoint.
- where that cannot be done (the ids are unknown, or the server ignores logit_bias: its answer is
  not the biased token), the judge asks once more with `fallback_top_logprobs` tokens when that is
  set. A pairwise label still missing then is bounded by the last returned token's probability
  (the server returns the *most* likely tokens, so one left out is at most that likely: the least
  confident soft label the data allow); with neither label (no score token) returned the judgment
  is *undecided*: never a silent 0.5, never cached, counted in `stats()`, listed by the labeling
  jobs beside their output and an error anywhere else (judges/base.py).

The transport is the judge's `inference.http.OpenAIClient` (concurrency, retries with backoff,
the fleet of `base_urls`, the API key read from `api_key_env` at request time and masked in every
error message). The judge adds what is a judge's: a reply whose log-probs are NaN, infinite or
above 0 is unusable (retried like a 5xx, never a label), and a 400 hints at top_logprobs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from openrlaif.config import DecodingConfig, OpenAIJudgeConfig, answer_fields
from openrlaif.errors import JudgeError
from openrlaif.inference.http import OpenAIClient, UnusableReply
from openrlaif.judges.base import (
    Judge,
    OrderedPair,
    OrderJudgment,
    ScoreJudgment,
    expected_score_to_unit,
    two_way_softmax,
)
from openrlaif.judges.prompts import load_judge_templates, render_pairwise

TopTokens = list[tuple[str, float]]  # (token text, logprob) for the most likely next tokens


# ---------------------------------------------------------------- reading the returned tokens


def _normalise(token: str) -> str:
    """A token's text as a label: whitespace and the "▁" (SentencePiece) / "Ġ" (byte-level BPE)
    space markers removed; servers that return raw token strings rather than decoded text
    still match."""
    return token.replace("▁", " ").replace("Ġ", " ").strip()


def _logsumexp(values: Sequence[float]) -> float:
    high = max(values)
    if high == -math.inf:
        return -math.inf
    return high + math.log(sum(math.exp(v - high) for v in values))


def label_logprobs(top: TopTokens, labels: Sequence[str]) -> dict[str, float]:
    """log P(label) for each label that appears among the returned tokens (summed over the
    tokens whose normalised text is the label)."""
    found: dict[str, list[float]] = {}
    for token, logprob in top:
        label = _normalise(token)
        if label in labels:
            found.setdefault(label, []).append(logprob)
    return {label: _logsumexp(lps) for label, lps in found.items()}


def bounded_soft_label(found: dict[str, float], top: TopTokens, labels: tuple[str, str]) -> float:
    """P(labels[0]) from the labels' log-probs `found` (at least one of the two) read from the reply
    `top`. A label missing from it is bounded by the reply's smallest probability: the server
    returns the *most* likely tokens, so anything left out is at most that likely. The bound (rather
    than zero) gives the least confident soft label the data allow, not a spurious 0 or 1."""
    floor = min(lp for _, lp in top)
    return two_way_softmax(found.get(labels[0], floor), found.get(labels[1], floor))


class LogitBiasIgnored(JudgeError):
    """The server's answer under a logit_bias of +100 on a token was another token."""


def biased_label_logprob(replies: Sequence[TopTokens], label: str) -> float | None:
    """log P(label) from one reply per token that spells it, each asked for with a logit_bias on
    that token alone (so the reply's answer is that token, with its log-prob): the log of their
    summed probabilities. None when a reply carries the bias in its log-probs (the token comes
    back with probability ~1, though the plain reply left the label out): the caller then biases
    both labels in one request (an equal bias keeps their ratio). JudgeError when the answer is
    not the label: LogitBiasIgnored."""
    logprobs = []
    for top in replies:
        got = label_logprobs(top, [label])
        if label not in got:
            raise LogitBiasIgnored(
                f"with logit_bias on a token of label {label!r} the server still did not answer with it: it "
                "ignores logit_bias (or `tokenizer` is not the served model's)"
            )
        if got[label] > BIASED_LOGPROB:
            return None
        logprobs.append(got[label])
    return _logsumexp(logprobs)


def _best_variant(top: TopTokens, label: str) -> str:
    """The raw text of the most likely returned token that reads as `label` (e.g. " 1"); the label
    itself when none does (it was read with logit_bias)."""
    return max(((lp, token) for token, lp in top if _normalise(token) == label), default=(0.0, label))[1]


@dataclass
class LabelReading:
    """The labels' log-probs read after one prompt: `found` (every label's shifted alike when read
    with an equal bias on all of them: only their ratios mean anything), the reply `top` they
    were read from (its last token bounds a label still missing) and, when a label is still
    missing, `why` it could not be read."""

    found: dict[str, float]
    top: TopTokens
    why: str | None = None
    biased: TopTokens = field(default_factory=list)  # the label tokens read one at a time with logit_bias

    def spelling(self, label: str) -> str:
        """The raw text of the most likely token read that spells `label` (e.g. " 1")."""
        return _best_variant(self.top + self.biased, label)


# ---------------------------------------------------------------- parsing replies


# Slack for rounding in the server's arithmetic (float32, bf16 logits): a log-prob may come back a
# hair above 0, and the top tokens' probabilities may sum a hair above 1.
LOGPROB_SLACK = 1e-4
PROBABILITY_SLACK = 1e-3

BIAS = 100  # the largest logit bias OpenAI and vLLM accept
# A label the plain reply left out (so at most as likely as its last token), back with a log-prob
# above this under logit_bias: the server applied the bias to the log-probs it returns.
BIASED_LOGPROB = -0.01


def usable_top(top: TopTokens) -> TopTokens:
    """`top` when its numbers can be probabilities: every log-prob finite and at most 0, their
    probabilities summing to at most 1. A reply with NaN, ±inf or p > 1 is a server fault: it is
    retried like a garbled reply and never becomes a label (softmax over it gives NaN)."""
    for token, logprob in top:
        if not math.isfinite(logprob) or logprob > LOGPROB_SLACK:
            raise UnusableReply(f"the log-prob of token {token!r} is {logprob}, not a log-probability")
    total = math.fsum(math.exp(logprob) for _, logprob in top)
    if total > 1.0 + PROBABILITY_SLACK:
        raise UnusableReply(f"the returned tokens' probabilities sum to {total:.4g}, more than 1")
    return top


def _completion_top(data: Any) -> TopTokens:
    logprobs = data["choices"][0]["logprobs"]
    top = logprobs["top_logprobs"][0]
    if not isinstance(top, dict):
        raise UnusableReply("top_logprobs[0] is not an object")
    pairs = [(str(token), float(lp)) for token, lp in top.items()]
    # The sampled token, in case a server lists it apart from the top ones.
    tokens, token_lps = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if tokens and token_lps and token_lps[0] is not None and tokens[0] not in top:
        pairs.append((str(tokens[0]), float(token_lps[0])))
    return usable_top(pairs)


def _chat_top(data: Any) -> TopTokens:
    entry = data["choices"][0]["logprobs"]["content"][0]
    pairs = [(str(t["token"]), float(t["logprob"])) for t in entry["top_logprobs"]]
    if entry.get("token") is not None and all(entry["token"] != t for t, _ in pairs):
        pairs.append((str(entry["token"]), float(entry["logprob"])))
    return usable_top(pairs)


def _completion_text(data: Any) -> str:
    text = data["choices"][0]["text"]
    if not isinstance(text, str):
        raise UnusableReply("choices[0].text is not a string")
    return text


def _chat_text(data: Any) -> str:
    text = data["choices"][0]["message"]["content"]
    if not isinstance(text, str):
        raise UnusableReply("choices[0].message.content is not a string")
    return text


# ---------------------------------------------------------------- the judge


class OpenAIJudge(Judge):
    """Soft labels and scores from the next-token log-probs an OpenAI-compatible server returns;
    its `client` sends the requests."""

    backend: ClassVar[str] = "openai"

    def __init__(self, config: OpenAIJudgeConfig) -> None:
        super().__init__()
        self.config = config
        self.templates = load_judge_templates(
            config.template, config.principles, config.principles_per_judgment, config.seed
        )
        self.client = OpenAIClient(
            config,
            name="openai judge",
            error_type=JudgeError,
            bad_request_hint=" (check top_logprobs against the server's limit, e.g. vLLM --max-logprobs)",
        )
        self._ids: dict[tuple[tuple[str, ...], str], dict[str, list[int]] | None] = {}  # `_label_ids`
        self._finding: dict[tuple[tuple[str, ...], str], asyncio.Future[dict[str, list[int]] | None]] = {}
        # How the labels were read when some were not among the top tokens (`stats`).
        self.reads = {"biased_reads": 0, "widened_reads": 0, "bounded_reads": 0, "undecided": 0}

    def stats(self) -> dict[str, Any]:
        """Requests, retries and failures in total and per base URL; the readings that needed more
        than the top tokens: with logit_bias (`biased_reads`), with fallback_top_logprobs
        (`widened_reads`), a pairwise label bounded by the last returned token (`bounded_reads`),
        and those left `undecided`."""
        return self.client.stats() | self.reads

    def close(self) -> None:
        """Close the HTTP connections and stop the event-loop thread (restarted if used again)."""
        self.client.close()

    # ------------------------------------------------------------ identity

    @property
    def model_name(self) -> str:
        return self.config.model

    def template_hash(self, kind: str) -> str:
        return self.templates.pairwise.hash() if kind == "pair" else self.templates.score.hash()

    def fingerprint(self, kind: str) -> dict[str, Any]:
        """Backend, model, endpoint, top_logprobs, the template's hash and (for pairs) the
        decoding settings. Speed-only settings (URLs, concurrency, timeouts, the key's variable)
        are left out by `answer_fields`; the key itself is never on the config."""
        fields = answer_fields(self.config)
        fields.pop("template", None)  # the name; the content's hash goes in instead
        fields["template_hash"] = self.template_hash(kind)
        if kind == "score":  # direct scores read one token: chain of thought does not apply
            for name in DecodingConfig.model_fields:
                fields.pop(name, None)
        return fields

    # ------------------------------------------------------------ batched primitives

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        return self.client.run(self.client.gather([self._judge_pair(item) for item in items]))

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        return self.client.run(
            self.client.gather([self._score(prompt, response) for prompt, response in items])
        )

    # ------------------------------------------------------------ one judgment

    async def _judge_pair(self, item: OrderedPair) -> OrderJudgment:
        t = self.templates.pairwise
        if not self.config.cot:
            return await self._soft_label(render_pairwise(t, item.prompt, item.first, item.second))

        n = self.config.self_consistency

        async def sample(i: int) -> tuple[str, OrderJudgment]:
            # Step 1: a rationale, greedy for a single sample; seeded samples otherwise.
            temperature = 0.0 if n == 1 else self.config.temperature
            rationale = await self._generate(
                t.prefix() + t.cot_suffix(item.prompt, item.first, item.second),
                temperature,
                self.config.seed + i,
            )
            # Step 2: the labels, read after the rationale and the usual ending.
            prompt = render_pairwise(t, item.prompt, item.first, item.second, rationale)
            return rationale.strip(), await self._soft_label(prompt)

        samples = await self.client.gather([sample(i) for i in range(n)])
        undecided = next((j.undecided for _, j in samples if j.undecided), None)
        if undecided:  # an average over the readable samples would be another judge's answer
            return OrderJudgment.unreadable(undecided)
        return OrderJudgment(
            p_first=sum(j.p_first for _, j in samples) / n, rationales=[rationale for rationale, _ in samples]
        )

    async def _soft_label(self, prompt: str) -> OrderJudgment:
        """P(first label) after `prompt` (`_read_labels`); undecided when neither label is read."""
        t = self.templates.pairwise
        reading = await self._read_labels(prompt, t.labels, t.ending)
        if not reading.found:
            self.reads["undecided"] += 1
            return OrderJudgment.unreadable(
                f"neither label {t.labels[0]!r} nor {t.labels[1]!r} is among the {len(reading.top)} most likely "
                f"next tokens, and {reading.why}"
            )
        if reading.why:
            self.reads["bounded_reads"] += 1
        return OrderJudgment(p_first=bounded_soft_label(reading.found, reading.top, t.labels))

    async def _read_labels(
        self, prompt: str, labels: Sequence[str], ending: str, need_all: bool = True
    ) -> LabelReading:
        """The labels' log-probs after `prompt`: from the top tokens; the single-token labels
        missing from them with a logit_bias on their tokens, else from `fallback_top_logprobs`
        tokens (module docstring). Without `need_all` (the score scale) a missing label whose ids
        are unknown is asked for again only when no label was returned."""
        top = await self._next_token(prompt)
        found = label_logprobs(top, labels)
        missing = [label for label in labels if label not in found]
        if not missing:
            return LabelReading(found, top)
        ids = await self._label_ids(labels, ending)
        if ids is not None and any(ids[label] for label in missing):
            try:
                biased = await self._biased_read(prompt, labels, LabelReading(found, top), ids)
                self.reads["biased_reads"] += 1
                return biased
            except LogitBiasIgnored as e:
                why = str(e)
        elif found and not need_all:  # the scale's other labels: ids unknown, or none (a "10" split in two)
            return LabelReading(found, top)
        elif ids is not None:
            why = f"{missing} have no single token to bias"
        elif self.config.label_bias == "off":
            why = "label_bias is off"
        else:
            why = "their token ids are unknown (no `tokenizer` set, and the server has no tokenize endpoint)"
        wider = self.config.fallback_top_logprobs
        if wider is not None:
            self.reads["widened_reads"] += 1
            top = await self._next_token(prompt, top=wider)
            found = label_logprobs(top, labels)
            why += f"; not among the {wider} most likely either (fallback_top_logprobs)"
        return LabelReading(found, top, None if all(label in found for label in labels) else why)

    async def _biased_read(
        self, prompt: str, labels: Sequence[str], plain: LabelReading, ids: dict[str, list[int]]
    ) -> LabelReading:
        """`plain` completed with each missing label that has token ids, read with a logit_bias
        on each of its tokens in turn; when the server returns biased log-probs, all labels at
        once with the same bias. LogitBiasIgnored when the server ignores the bias."""
        found, read = dict(plain.found), []
        for label in (label for label in labels if label not in found and ids[label]):
            replies = await self.client.gather([self._next_token(prompt, {i: BIAS}) for i in ids[label]])
            logprob = biased_label_logprob(replies, label)
            read += [(token, lp) for reply in replies for token, lp in reply if _normalise(token) == label]
            if logprob is None:  # the server's log-probs carry the bias: every label at once, the same bias
                bias = {i: BIAS for label in labels for i in ids[label]}
                top = await self._next_token(prompt, bias, top=max(self.config.top_logprobs, len(bias)))
                found = label_logprobs(top, labels)
                unread = [label for label in labels if label not in found and ids[label]]
                if unread:
                    raise LogitBiasIgnored(
                        f"with logit_bias on their tokens the server did not return {unread}"
                    )
                return LabelReading(found, top)
            found[label] = logprob
        return LabelReading(found, plain.top, biased=read)

    async def _label_ids(self, labels: Sequence[str], ending: str) -> dict[str, list[int]] | None:
        """The ids of every single token that spells each label after `ending` (made once; [] for a
        label with none, such as "10" split into "1" "0"): from the `tokenizer` setting, else the
        server's tokenize endpoint; None with `label_bias: off` or when neither is there."""
        if self.config.label_bias == "off":
            return None
        key = (tuple(labels), ending)
        if key not in self._ids:
            if key not in self._finding:  # the judgments running at once wait for one search
                self._finding[key] = asyncio.ensure_future(self._find_label_ids(labels, ending))
            try:
                self._ids[key] = await self._finding[key]
            finally:
                self._finding.pop(key, None)
        return self._ids[key]

    async def _find_label_ids(self, labels: Sequence[str], ending: str) -> dict[str, list[int]] | None:
        if self.config.tokenizer is None:
            return await self._server_label_ids(labels, ending)
        from openrlaif.judges.tokens import label_token_ids  # why: imports torch
        from openrlaif.models.loading import load_tokenizer  # why: transformers is slow to import

        tokenizer = load_tokenizer(self.config.tokenizer)
        ids = {}
        for label in labels:
            try:
                ids[label] = label_token_ids(tokenizer, label, ending)
            except JudgeError:  # no single token spells it
                ids[label] = []
        return ids

    async def _server_label_ids(self, labels: Sequence[str], ending: str) -> dict[str, list[int]] | None:
        """Label token ids through the server's tokenize endpoint: the last token of `before +
        label` and of `before + " " + label` (a space may merge with the digit) where the text
        before it encodes as `before` does, after the ending and after a newline (mid-text)."""
        befores = [ending, "\n"]
        texts = [*befores, *(b + space + label for b in befores for space in ("", " ") for label in labels)]
        encoded = await self._tokenize(list(dict.fromkeys(texts)))
        if encoded is None:
            return None
        return {label: sorted({encoded[b + space + label][-1] for b in befores for space in ("", " ")
                               if encoded[b + space + label][:-1] == encoded[b]}) for label in labels}  # fmt: skip

    async def _tokenize(self, texts: Sequence[str]) -> dict[str, list[int]] | None:
        """Token ids of each text from the first fleet member's tokenize endpoint: vLLM's and
        llama.cpp's `/tokenize`, llama-cpp-python's `/extras/tokenize` (both beside `/v1`). None
        when it has neither."""
        root = self.config.base_urls[0].rstrip("/").removesuffix("/v1")
        for path, key in (("/tokenize", "prompt"), ("/extras/tokenize", "input")):
            out: dict[str, list[int]] = {}
            for text in texts:
                body = {"model": self.model_name, key: text} | ({"content": text} if key == "prompt" else {})
                try:
                    response = await self.client.post_once(root + path, body, self.config.timeout_s)
                    tokens = response.json()["tokens"] if response.status_code == 200 else None
                except (httpx.HTTPError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError):
                    tokens = None
                if not isinstance(tokens, list) or not all(isinstance(i, int) for i in tokens):
                    break
                out[text] = tokens
            else:
                return out
        return None

    async def _score(self, context: str, response: str) -> ScoreJudgment:
        t = self.templates.score
        prompt = t.prefix() + t.suffix(context, response)
        reading = await self._read_labels(prompt, t.scores, t.ending, need_all=False)
        found, top = reading.found, reading.top
        if not found:
            self.reads["undecided"] += 1
            return ScoreJudgment.unreadable(
                f"none of the scores {t.scores[0]}..{t.scores[-1]} is among the {len(top)} most likely next "
                f"tokens, and {reading.why}"
            )
        probs = {label: math.exp(lp) for label, lp in found.items()}
        # Tokenizers that split "10" into "1" + "0" never return "10": P("1") then also holds
        # P("10"). The completions endpoint can continue the prompt after the "1" token and split
        # it by P("0" | "1"). Chat cannot (the reply is always a fresh assistant turn), so there
        # "10" is read only when it is one token.
        if self.config.endpoint == "completions":
            heads = {s[:-1] for s in t.scores if s not in found and len(s) > 1 and s[:-1] in found}
            for head in sorted(heads):
                # P("0" | "1") from the top tokens (fallback_top_logprobs of them when set): a tail
                # left out is at most the last one's probability, and P("10") counts in P("1")
                after = await self._next_token(
                    prompt + reading.spelling(head), top=self.config.fallback_top_logprobs
                )
                p_head = probs[head]
                for label in (s for s in t.scores if s not in found and s[:-1] == head):
                    # The continuation must be the digit itself: " 0" would read "1 0", not "10".
                    p_tail = sum(math.exp(lp) for token, lp in after if token == label[-1])
                    probs[label] = p_head * p_tail
                    probs[head] -= p_head * p_tail
        total = sum(probs.values())
        if total <= 0.0:
            raise self.client.error("every score token has probability 0; fix the score template")
        values = [float(s) for s in t.scores]
        expected = sum(float(label) * p for label, p in probs.items()) / total
        return ScoreJudgment(
            score=expected_score_to_unit(expected, min(values), max(values)), expected=expected
        )

    # ------------------------------------------------------------ request bodies

    async def _next_token(
        self, prompt: str, bias: dict[int, int] | None = None, top: int | None = None
    ) -> TopTokens:
        """The top log-probabilities (`top`, default top_logprobs) of the first token the model
        would write after `prompt` (and the token it writes, when the server lists it apart), with
        `bias` as the logit_bias."""
        k = top or self.config.top_logprobs
        extra = {"logit_bias": {str(i): b for i, b in bias.items()}} if bias else {}
        if self.config.endpoint == "completions":
            body = {
                "model": self.model_name,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": k,
                **extra,
            }
            return await self.client.post("/completions", body, _completion_top)
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": k,
            **extra,
        }
        return await self.client.post("/chat/completions", body, _chat_top)

    async def _generate(self, prompt: str, temperature: float, seed: int) -> str:
        common = {"model": self.model_name, "max_tokens": self.config.max_rationale_tokens}
        common |= {"temperature": temperature, "seed": seed}
        if self.config.endpoint == "completions":
            return await self.client.post("/completions", {**common, "prompt": prompt}, _completion_text)
        body = {**common, "messages": [{"role": "user", "content": prompt}]}
        return await self.client.post("/chat/completions", body, _chat_text)
