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

Requests run concurrently on a private event loop in a background thread (so the synchronous
API works from scripts, threads and notebooks alike), at most `concurrency` at a time, spread
over `base_urls` (least in flight, round-robin on ties). Transient failures (429, 5xx, timeouts,
connection errors, unparsable or incomplete replies, log-probs that are NaN, infinite or above 0)
are retried with exponential backoff and full jitter, on a different server when there is one;
other 4xx fail at once. That transport is `OpenAIClient`, which `openrlaif generate` shares.

The API key is read from the environment variable named by `api_key_env` at request time and
only ever placed in the Authorization header: it is not stored on the judge, and it is masked in
every error message the judge raises, whole and in pieces (`redaction.redact`: servers echo keys
partly masked, "sk-TESTS*****T123").
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import httpx

from openrlaif.config import DecodingConfig, OpenAIJudgeConfig, answer_fields
from openrlaif.errors import JudgeError, OpenRLAIFError
from openrlaif.judges.base import (
    Judge,
    OrderedPair,
    OrderJudgment,
    ScoreJudgment,
    expected_score_to_unit,
    two_way_softmax,
)
from openrlaif.judges.prompts import load_template_set, render_pairwise
from openrlaif.redaction import redact

T = TypeVar("T")

TopTokens = list[tuple[str, float]]  # (token text, logprob) for the most likely next tokens


class _Unusable(Exception):
    """A 200 reply that cannot be read (invalid JSON, missing fields): retried like a 5xx."""


@dataclass
class ServerStats:
    """Counters for one base URL, for the CLI to report."""

    url: str
    requests: int = 0  # attempts sent, retries included
    retries: int = 0  # attempts that were retries of a failed attempt (elsewhere or here)
    failures: int = 0  # attempts that failed (each one retried, or the last one)
    in_flight: int = 0
    consecutive_failures: int = 0
    avoid_until: float = 0.0  # monotonic time; a failing server is tried last until then


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


def soft_label(top: TopTokens, labels: tuple[str, str], model: str) -> float:
    """P(labels[0]) from the two labels' probabilities among the top tokens.

    When exactly one label is missing, its probability is bounded by the smallest returned
    probability: the server returns the *most* likely tokens, so anything left out is at most
    that likely. Using the bound (rather than zero) gives the least confident soft label the
    data allow, instead of a spurious 0 or 1. With both labels missing nothing can be said.
    """
    found = label_logprobs(top, labels)
    if not found:
        raise JudgeError(
            f"openai judge {model!r}: neither label {labels[0]!r} nor {labels[1]!r} is among the {len(top)} "
            "most likely next tokens; raise top_logprobs or fix the template so the model answers with a label"
        )
    floor = min(lp for _, lp in top)
    return two_way_softmax(found.get(labels[0], floor), found.get(labels[1], floor))


def _best_variant(top: TopTokens, label: str) -> str:
    """The raw text of the most likely returned token that reads as `label` (e.g. " 1")."""
    return max((lp, token) for token, lp in top if _normalise(token) == label)[1]


# ---------------------------------------------------------------- parsing replies


# Slack for rounding in the server's arithmetic (float32, bf16 logits): a log-prob may come back a
# hair above 0, and the top tokens' probabilities may sum a hair above 1.
LOGPROB_SLACK = 1e-4
PROBABILITY_SLACK = 1e-3


def usable_top(top: TopTokens) -> TopTokens:
    """`top` when its numbers can be probabilities: every log-prob finite and at most 0, their
    probabilities summing to at most 1. A reply with NaN, ±inf or p > 1 is a server fault: it is
    retried like a garbled reply and never becomes a label (softmax over it gives NaN)."""
    for token, logprob in top:
        if not math.isfinite(logprob) or logprob > LOGPROB_SLACK:
            raise _Unusable(f"the log-prob of token {token!r} is {logprob}, not a log-probability")
    total = math.fsum(math.exp(logprob) for _, logprob in top)
    if total > 1.0 + PROBABILITY_SLACK:
        raise _Unusable(f"the returned tokens' probabilities sum to {total:.4g}, more than 1")
    return top


def _completion_top(data: Any) -> TopTokens:
    logprobs = data["choices"][0]["logprobs"]
    top = logprobs["top_logprobs"][0]
    if not isinstance(top, dict):
        raise _Unusable("top_logprobs[0] is not an object")
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
        raise _Unusable("choices[0].text is not a string")
    return text


def _chat_text(data: Any) -> str:
    text = data["choices"][0]["message"]["content"]
    if not isinstance(text, str):
        raise _Unusable("choices[0].message.content is not a string")
    return text


def _server_explanation(response: httpx.Response) -> str:
    """OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's {"detail"}, or the text."""
    try:
        data = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return response.text


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait: OpenAI's retry-after-ms, or Retry-After as seconds
    or an HTTP date."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


def _one_line(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the transport


class OpenAIClient:
    """Requests to a fleet of OpenAI-compatible servers: concurrency, retries, fleet routing,
    the API key. Shared by the judge and `openrlaif generate`; `config` needs `model`,
    `base_urls`, `api_key_env`, `concurrency`, `timeout_s`, `max_retries`, `backoff_base_s` and
    `backoff_max_s`. Subclasses name themselves in errors and add a hint for HTTP 400."""

    client_name: ClassVar[str] = "openai client"  # starts every error message
    error_type: ClassVar[type[OpenRLAIFError]] = OpenRLAIFError
    bad_request_hint: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.servers = [ServerStats(url.rstrip("/")) for url in config.base_urls]
        self._next = 0  # round-robin start among equally loaded servers
        self._jitter = random.Random()  # backoff only; never affects an answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._finalizer: weakref.finalize | None = None

    def stats(self) -> dict[str, Any]:
        """Requests, retries and failures in total and per base URL."""
        names = ("requests", "retries", "failures")
        per_url = {s.url: {k: v for k, v in asdict(s).items() if k in names} for s in self.servers}
        totals = {k: sum(v[k] for v in per_url.values()) for k in names}
        return {**totals, "servers": per_url}

    def close(self) -> None:
        """Close the HTTP connections and stop the event-loop thread (restarted if used again)."""
        with self._start_lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            if self._finalizer is not None:
                self._finalizer.detach()
            if self._client is not None:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = None
            self._client = None
            self._slots = None

    # ------------------------------------------------------------ transport

    def _api_key(self) -> str | None:
        name = self.config.api_key_env
        return (os.environ.get(name) or None) if name else None

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key())

    def _clean(self, text: str, limit: int = 200) -> str:
        """Server-supplied text for an error message: key scrubbed first, then cut short."""
        return _one_line(self._redact(text), limit)

    def _pick(self, avoid: ServerStats | None) -> ServerStats:
        """Least in flight among servers not recently failing, round-robin on ties; never the
        server that just failed when there is another."""
        now = time.monotonic()
        n = len(self.servers)
        order = [(i, s) for i, s in enumerate(self.servers) if s is not avoid] or list(
            enumerate(self.servers)
        )
        i, server = min(
            order, key=lambda e: (e[1].avoid_until > now, e[1].in_flight, (e[0] - self._next) % n)
        )
        self._next = (i + 1) % n
        return server

    def _failed(self, server: ServerStats, wait: float) -> None:
        server.failures += 1
        server.consecutive_failures += 1
        backoff = self.config.backoff_base_s * 2 ** min(server.consecutive_failures, 16)
        server.avoid_until = time.monotonic() + max(wait, min(self.config.backoff_max_s, backoff))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.config.backoff_max_s
        if retry_after is not None:
            return min(cap, retry_after)
        return self._jitter.uniform(0.0, min(cap, self.config.backoff_base_s * 2**attempt))  # full jitter

    async def _post(self, path: str, body: dict[str, Any], read: Callable[[Any], T]) -> T:
        """POST `body` to one fleet member and read the reply, retrying transient failures."""
        client, slots = self._client, self._slots
        assert client is not None and slots is not None  # made by _run before any request
        attempts = self.config.max_retries + 1
        timeout = self.config.timeout_s
        tried: list[str] = []
        failure = ""
        server: ServerStats | None = None
        for attempt in range(attempts):
            retry_after: float | None = None
            async with slots:
                server = self._pick(avoid=server)
                url = server.url + path
                if server.url not in tried:
                    tried.append(server.url)
                server.requests += 1
                server.retries += int(attempt > 0)
                server.in_flight += 1
                try:
                    response = await asyncio.wait_for(
                        client.post(url, json=body, headers=self._headers()), timeout
                    )
                    if response.status_code == 200:
                        try:
                            value = read(response.json())
                        except (ValueError, KeyError, IndexError, TypeError, _Unusable) as e:
                            why = str(e) if isinstance(e, _Unusable) else f"{type(e).__name__}: {e}"
                            raise _Unusable(f"unusable reply ({why})") from None
                        server.consecutive_failures = 0
                        server.avoid_until = 0.0
                        return value
                    if response.status_code != 429 and response.status_code < 500:
                        server.failures += 1  # counted, but not held against the server's health
                        raise self._error(
                            f"{url} answered HTTP {response.status_code}: {self._clean(_server_explanation(response))}"
                            + _hint(response.status_code, self.config, self.bad_request_hint)
                        )
                    failure = f"HTTP {response.status_code}: {self._clean(_server_explanation(response))}"
                    retry_after = _retry_after(response.headers)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    failure = f"no reply within timeout_s={timeout:g}"
                except httpx.RequestError as e:
                    failure = self._clean(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                except _Unusable as e:
                    failure = self._clean(str(e))
                finally:
                    server.in_flight -= 1
            wait = self._backoff(attempt, retry_after)
            self._failed(server, retry_after or 0.0)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)  # outside the slot, so other requests keep going
        raise self._error(
            f"{path.lstrip('/')} failed after {attempts} attempt(s) on {', '.join(tried)}; last failure: "
            f"{failure}. Check that the server is up and serves this model, or raise max_retries/timeout_s"
        )

    def _error(self, message: str) -> OpenRLAIFError:
        """A one-line error naming the model, with the API key scrubbed (a server may echo it)."""
        return self.error_type(
            self._redact(_one_line(f"{self.client_name} {self.config.model!r}: {message}"))
        )

    def _headers(self) -> dict[str, str]:
        key = self._api_key()  # read per request: rotating the variable takes effect at once
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ------------------------------------------------------------ event loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the judge's own loop thread and wait for it; works from any thread,
        including one that already runs an event loop."""
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever,
                    name=f"openrlaif-{self.client_name.replace(' ', '-')}",
                    daemon=True,
                )
                thread.start()
                self._loop, self._thread = loop, thread
                # A judge dropped without close() must not leave its loop thread spinning.
                self._finalizer = weakref.finalize(self, loop.call_soon_threadsafe, loop.stop)
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: stop the batch instead of leaving it running
            raise

    async def _open(self) -> None:
        # Created on the loop that uses them; the pool never needs more than `concurrency`.
        n = self.config.concurrency
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )
        self._slots = asyncio.Semaphore(n)

    @staticmethod
    async def _all(aws: Sequence[Awaitable[T]]) -> list[T]:
        """Await all; on the first error cancel the rest instead of letting them run on."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


# ---------------------------------------------------------------- the judge


class OpenAIJudge(OpenAIClient, Judge):  # the client first: its close() is the real one
    backend: ClassVar[str] = "openai"
    client_name: ClassVar[str] = "openai judge"
    error_type: ClassVar[type[OpenRLAIFError]] = JudgeError
    bad_request_hint: ClassVar[str] = (
        " (check top_logprobs against the server's limit, e.g. vLLM --max-logprobs)"
    )

    def __init__(self, config: OpenAIJudgeConfig) -> None:
        Judge.__init__(self)
        OpenAIClient.__init__(self, config)
        self.config: OpenAIJudgeConfig = config
        self.templates = load_template_set(config.template)

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
        return self._run(self._all([self._judge_pair(item) for item in items]))

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        return self._run(self._all([self._score(prompt, response) for prompt, response in items]))

    # ------------------------------------------------------------ one judgment

    async def _judge_pair(self, item: OrderedPair) -> OrderJudgment:
        t = self.templates.pairwise
        if not self.config.cot:
            prompt = render_pairwise(t, item.prompt, item.first, item.second)
            return OrderJudgment(
                p_first=soft_label(await self._next_token(prompt), t.labels, self.model_name)
            )

        n = self.config.self_consistency

        async def sample(i: int) -> tuple[str, float]:
            # Step 1: a rationale, greedy for a single sample; seeded samples otherwise.
            temperature = 0.0 if n == 1 else self.config.temperature
            rationale = await self._generate(
                t.prefix() + t.cot_suffix(item.prompt, item.first, item.second),
                temperature,
                self.config.seed + i,
            )
            # Step 2: the labels, read after the rationale and the usual ending.
            prompt = render_pairwise(t, item.prompt, item.first, item.second, rationale)
            return rationale.strip(), soft_label(await self._next_token(prompt), t.labels, self.model_name)

        samples = await self._all([sample(i) for i in range(n)])
        return OrderJudgment(
            p_first=sum(p for _, p in samples) / n, rationales=[rationale for rationale, _ in samples]
        )

    async def _score(self, context: str, response: str) -> ScoreJudgment:
        t = self.templates.score
        prompt = t.prefix() + t.suffix(context, response)
        top = await self._next_token(prompt)
        found = label_logprobs(top, t.scores)
        if not found:
            raise self._error(
                f"none of the scores {t.scores[0]}..{t.scores[-1]} is among the {len(top)} most likely next "
                "tokens; raise top_logprobs or fix the score template"
            )
        probs = {label: math.exp(lp) for label, lp in found.items()}
        # Tokenizers that split "10" into "1" + "0" never return "10": P("1") then also holds
        # P("10"). The completions endpoint can continue the prompt after the "1" token and split
        # it by P("0" | "1"). Chat cannot (the reply is always a fresh assistant turn), so there
        # "10" is read only when it is one token.
        if self.config.endpoint == "completions":
            heads = {s[:-1] for s in t.scores if s not in found and len(s) > 1 and s[:-1] in found}
            for head in sorted(heads):
                after = await self._next_token(prompt + _best_variant(top, head))
                p_head = probs[head]
                for label in (s for s in t.scores if s not in found and s[:-1] == head):
                    # The continuation must be the digit itself: " 0" would read "1 0", not "10".
                    p_tail = sum(math.exp(lp) for token, lp in after if token == label[-1])
                    probs[label] = p_head * p_tail
                    probs[head] -= p_head * p_tail
        total = sum(probs.values())
        if total <= 0.0:
            raise self._error("every score token has probability 0; fix the score template")
        values = [float(s) for s in t.scores]
        expected = sum(float(label) * p for label, p in probs.items()) / total
        return ScoreJudgment(
            score=expected_score_to_unit(expected, min(values), max(values)), expected=expected
        )

    # ------------------------------------------------------------ request bodies

    async def _next_token(self, prompt: str) -> TopTokens:
        """The top log-probabilities of the first token the model would write after `prompt`."""
        k = self.config.top_logprobs
        if self.config.endpoint == "completions":
            body = {
                "model": self.model_name,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": k,
            }
            return await self._post("/completions", body, _completion_top)
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": k,
        }
        return await self._post("/chat/completions", body, _chat_top)

    async def _generate(self, prompt: str, temperature: float, seed: int) -> str:
        common = {"model": self.model_name, "max_tokens": self.config.max_rationale_tokens}
        common |= {"temperature": temperature, "seed": seed}
        if self.config.endpoint == "completions":
            return await self._post("/completions", {**common, "prompt": prompt}, _completion_text)
        body = {**common, "messages": [{"role": "user", "content": prompt}]}
        return await self._post("/chat/completions", body, _chat_text)


def _hint(status: int, config: Any, bad_request_hint: str) -> str:
    if status in (401, 403):
        return (
            f" (check the API key in ${config.api_key_env})" if config.api_key_env else " (set api_key_env)"
        )
    if status == 404:
        return f" (check model={config.model!r} and base_urls)"
    if status == 400:
        return bad_request_hint
    return ""
