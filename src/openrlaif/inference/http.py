"""The OpenAI-compatible HTTP client: how judges and samplers talk to vLLM, SGLang, llama.cpp
server or OpenAI itself.

Requests run concurrently on a private event loop in a background thread (so the synchronous
API works from scripts, threads and notebooks alike), at most `concurrency` at a time, spread
over `base_urls` (least in flight, round-robin on ties). Transient failures (429, 5xx, timeouts,
connection errors, unparsable or incomplete replies) are retried with exponential backoff and
full jitter, or after the server's Retry-After, on a different server when there is one; other
4xx fail at once. A reader that finds a 200 reply unusable raises `UnusableReply`, and the
request is retried like a 5xx.

The API key is read from the environment variable named by `api_key_env` at request time and
only ever placed in the Authorization header: it is not stored on the client, and it is masked
in every error message the client raises, whole and in pieces (`redaction.redact`: servers echo
keys partly masked, "sk-TESTS*****T123").

The client is a part, not a base class: the judge (`judges.openai_compat.OpenAIJudge`) and the
samplers (`inference.server`) each hold one, named for their errors ("openai judge 'm': ...").
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import httpx

from openrlaif.errors import OpenRLAIFError
from openrlaif.redaction import redact

T = TypeVar("T")


class ClientSettings(Protocol):
    """What the client reads from its config (an `OpenAIJudgeConfig` or a `ServerConfig`)."""

    @property
    def model(self) -> str: ...  # the name the server serves; every error message names it
    @property
    def base_urls(self) -> Sequence[str]: ...
    @property
    def api_key_env(self) -> str | None: ...  # the *name* of the variable holding the key
    @property
    def concurrency(self) -> int: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def backoff_base_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...


class UnusableReply(Exception):
    """A 200 reply that cannot be read (invalid JSON, missing fields, impossible numbers): a
    reader passed to `OpenAIClient.post` raises it, and the request is retried like a 5xx."""


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
    answered: int = 0  # attempts that got a usable reply


# ---------------------------------------------------------------- reading failed replies


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


def _hint(status: int, config: ClientSettings, bad_request_hint: str) -> str:
    """What to check after a 4xx that is not worth retrying."""
    if status in (401, 403):
        return (
            f" (check the API key in ${config.api_key_env})" if config.api_key_env else " (set api_key_env)"
        )
    if status == 404:
        return f" (check model={config.model!r} and base_urls)"
    if status == 400:
        return bad_request_hint
    return ""


# ---------------------------------------------------------------- the client


class OpenAIClient:
    """Requests to a fleet of OpenAI-compatible servers: concurrency, retries, fleet routing,
    the API key. `name` starts every error message (with the model's name), `error_type` is the
    error raised, and `bad_request_hint` is added to an HTTP 400's message (what its holder's
    requests may ask too much of)."""

    def __init__(
        self,
        config: ClientSettings,
        *,
        name: str = "openai client",
        error_type: type[OpenRLAIFError] = OpenRLAIFError,
        bad_request_hint: str = "",
    ) -> None:
        self.config = config
        self.name = name
        self.error_type = error_type
        self.bad_request_hint = bad_request_hint
        self.servers = [ServerStats(url.rstrip("/")) for url in config.base_urls]
        self._next = 0  # round-robin start among equally loaded servers
        self._jitter = random.Random()  # backoff only; never affects an answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._finalizer: weakref.finalize | None = None
        self.queueing_noticed = False  # a server that serves one request at a time (`_one_at_a_time`)

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

    def _one_at_a_time(self, server: ServerStats) -> str:
        """A request timed out while others to the same server were answered: the server is up
        and answers, but queues requests (llama-cpp-python's server runs one completion at a
        time). Said once per client, on stderr, and added to the error if the retries run out."""
        advice = (
            f"; {server.url} answered other requests meanwhile: it seems to serve one request at a time "
            f"and queue the rest, so with concurrency {self.config.concurrency} a request waits for those "
            "ahead of it. Set concurrency: 1 per such server (or raise timeout_s above concurrency x one "
            "request's time); README: tested servers and their settings"
        )
        if not self.queueing_noticed:
            self.queueing_noticed = True
            print(self._redact(f"warning: {self.name} {self.config.model!r}: a request timed out" + advice),
                  file=sys.stderr, flush=True)  # fmt: skip
        return advice

    # ------------------------------------------------------------ messages

    def error(self, message: str) -> OpenRLAIFError:
        """A one-line error naming the model, with the API key scrubbed (a server may echo it)."""
        return self.error_type(self._redact(_one_line(f"{self.name} {self.config.model!r}: {message}")))

    def clean(self, text: str, limit: int = 200) -> str:
        """Server-supplied text for an error message: key scrubbed first, then cut short."""
        return _one_line(self._redact(text), limit)

    def _api_key(self) -> str | None:
        name = self.config.api_key_env
        return (os.environ.get(name) or None) if name else None

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key())

    def _headers(self) -> dict[str, str]:
        key = self._api_key()  # read per request: rotating the variable takes effect at once
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ------------------------------------------------------------ requests

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

    async def post(self, path: str, body: dict[str, Any], read: Callable[[Any], T]) -> T:
        """POST `body` to `path` on one fleet member and return `read(reply JSON)`, retrying
        transient failures (on another member when there is one). Runs inside `run`."""
        client, slots = self._client, self._slots
        assert client is not None and slots is not None  # made by run before any request
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
                answered_before = server.answered
                try:
                    response = await asyncio.wait_for(
                        client.post(url, json=body, headers=self._headers()), timeout
                    )
                    if response.status_code == 200:
                        try:
                            value = read(response.json())
                        except (ValueError, KeyError, IndexError, TypeError, UnusableReply) as e:
                            why = str(e) if isinstance(e, UnusableReply) else f"{type(e).__name__}: {e}"
                            raise UnusableReply(f"unusable reply ({why})") from None
                        server.consecutive_failures = 0
                        server.avoid_until = 0.0
                        server.answered += 1
                        return value
                    if response.status_code != 429 and response.status_code < 500:
                        server.failures += 1  # counted, but not held against the server's health
                        raise self.error(
                            f"{url} answered HTTP {response.status_code}: {self.clean(_server_explanation(response))}"
                            + _hint(response.status_code, self.config, self.bad_request_hint)
                        )
                    failure = f"HTTP {response.status_code}: {self.clean(_server_explanation(response))}"
                    retry_after = _retry_after(response.headers)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    failure = f"no reply within timeout_s={timeout:g}"
                    if server.answered > answered_before:  # others were answered meanwhile
                        failure += self._one_at_a_time(server)
                except httpx.RequestError as e:
                    failure = self.clean(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                except UnusableReply as e:
                    failure = self.clean(str(e))
                finally:
                    server.in_flight -= 1
            wait = self._backoff(attempt, retry_after)
            self._failed(server, retry_after or 0.0)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)  # outside the slot, so other requests keep going
        raise self.error(
            f"{path.lstrip('/')} failed after {attempts} attempt(s) on {', '.join(tried)}; last failure: "
            f"{failure}. Check that the server is up and serves this model, or raise max_retries/timeout_s"
        )

    async def post_once(self, url: str, body: dict[str, Any], timeout: float) -> httpx.Response:
        """One POST to a full `url`, with the API key, no retries and no concurrency slot (an
        administrative request such as a weight reload). Raises httpx's errors, or TimeoutError
        after `timeout` seconds. Runs inside `run`."""
        assert self._client is not None  # made by run before any request
        request = self._client.post(url, json=body, headers=self._headers(), timeout=timeout)
        return await asyncio.wait_for(request, timeout)

    # ------------------------------------------------------------ event loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's own loop thread and wait for it; works from any thread,
        including one that already runs an event loop."""
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever,
                    name=f"openrlaif-{self.name.replace(' ', '-')}",
                    daemon=True,
                )
                thread.start()
                self._loop, self._thread = loop, thread
                # A client dropped without close() must not leave its loop thread spinning.
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
    async def gather(aws: Sequence[Awaitable[T]]) -> list[T]:
        """Await all; on the first error cancel the rest instead of letting them run on."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
