"""A small OpenAI-compatible server backed by a real tiny local causal LM, with fault injection.

Tests start it on 127.0.0.1, port 0 (a real socket), in a background thread:

    lm = LocalLM(model_dir)
    with OpenAITestServer(lm) as server:
        server.add_faults("429", "drop")      # the next two POSTs fail this way, then normal service
        ... OpenAIJudge(OpenAIJudgeConfig(model=server.model_name, base_urls=[server.url])) ...
        server.requests[-1].headers["authorization"]

It speaks the parts of the API the judge, `openrlaif generate` and RL rollouts use, in the shapes
vLLM, SGLang and OpenAI return:

- GET  /v1/models
- POST /v1/completions       prompt (text, or token ids as vLLM takes them), max_tokens, temperature,
                             seed, logprobs=N (top-N per position); vLLM's return_token_ids (the
                             choice's `token_ids` and `prompt_token_ids`) and
                             return_tokens_as_token_ids (log-prob tokens read "token_id:N")
- POST /v1/chat/completions  messages (the tokenizer's chat template when it has one), logprobs,
                             top_logprobs=N
- POST /tokenize              vLLM's: {"model", "prompt"} -> {"tokens": ids} (`tokenize` False: 404,
                             a server without one)
- logit_bias {"id": bias} on both endpoints: added to the logits the greedy/sampled token is drawn
                             from. The returned log-probs are the model's own (`logprobs_mode`
                             "raw", as llama.cpp's server and vLLM's default) or the biased ones
                             ("processed", vLLM --logprobs-mode processed_logprobs);
                             `ignore_logit_bias` drops it (a server without it).
- `one_at_a_time`: requests queue and are served one by one (llama-cpp-python's server does).
- POST /update_weights_from_disk  SGLang's weight reload: {"model_path": DIR} loads the weights of
                             the Hugging Face folder DIR into the served model (same architecture);
                             answers {"success", "message", "num_paused_requests"}. `reloads`
                             records (DIR, weights digest after the load) for each one.

Greedy when temperature == 0, else sampling with a torch generator seeded by `seed`. Top-N may be
as large as the vocabulary, so a test can read every token's log-probability.

Faults, consumed one per POST in order: "429" (with Retry-After), "500", "503", "400" and "401"
(non-retryable), "slow" (sleep `slow_s`, past the client's timeout, then answer), "garbled" (200
with invalid JSON), "nologprobs" (200, valid JSON, no logprobs), "drop" (close the connection
without a reply). The error faults carry `error_message` when it is set (a server that echoes
what it was sent, the API key included). The log-prob faults answer 200 with every returned
log-prob replaced: "nan", "inf", "-inf", "positive" (+0.5: a probability above 1) and "overfull"
(each log(0.6): valid one by one, summing past 1). `fail_all` set to a fault name makes every POST
fail that way (a dead fleet member).

Manual use: python tests/openai_server.py --model DIR --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.models.kv import cache_argument, output_cache

LOGPROB_FAULTS = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "positive": 0.5,
    "overfull": math.log(0.6),
}
FAULTS = ("429", "500", "503", "400", "401", "slow", "garbled", "nologprobs", "drop", *LOGPROB_FAULTS)


@dataclass
class Generation:
    """What one completion produced: token ids, per-position logprobs, the stop reason."""

    token_ids: list[int]  # generated ids, EOS included when it ended the sequence
    logprobs: list[float]  # log-probability of each generated id
    top: list[list[tuple[int, float]]]  # top-N (id, logprob) at each generated position
    finish_reason: str
    text: str  # the generated text, special tokens dropped


class LocalLM:
    """A Hugging Face causal LM and its tokenizer, one forward pass at a time (a lock)."""

    def __init__(self, model_dir: str | Path, name: str | None = None) -> None:
        self.path = Path(model_dir)
        self.name = name or self.path.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        # vLLM reports each token as its decoded text; precompute once.
        self.token_text = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]
        self.lock = threading.Lock()  # torch modules are not safe to call from several threads

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def load_weights(self, model_dir: str | Path) -> str:
        """Replace the served weights by those of `model_dir` (same architecture); returns their digest."""
        from openrlaif.training.checkpoint import weights_digest

        new = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with self.lock:
            self.model.load_state_dict(new.state_dict())
            return weights_digest(self.model)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template when the tokenizer has one (it adds its own special tokens), else
        the contents joined by newlines."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.encode_prompt("\n".join(m["content"] for m in messages))

    @torch.no_grad()
    def generate(
        self, input_ids: list[int], max_tokens: int, temperature: float, seed: int | None, top_n: int,
        bias: dict[int, float] | None = None, processed_logprobs: bool = False,
    ) -> Generation:  # fmt: skip
        with self.lock:
            generator = torch.Generator().manual_seed(seed if seed is not None else 0)
            ids = torch.tensor([input_ids])
            past: Any = None
            out = Generation([], [], [], "length", "")
            for _ in range(max_tokens):
                step = self.model(
                    input_ids=ids,
                    use_cache=True,
                    **({cache_argument(self.model): past} if past is not None else {}),
                )
                past = output_cache(step)
                raw = step.logits[0, -1].float()
                logits = raw.clone()
                for token_id, value in (bias or {}).items():
                    logits[token_id] += value
                logprobs = torch.log_softmax(logits if processed_logprobs else raw, dim=-1)
                if temperature == 0:
                    token = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                out.token_ids.append(token)
                out.logprobs.append(float(logprobs[token]))
                if top_n > 0:
                    values, indices = torch.topk(logprobs, min(top_n, self.vocab_size))
                    out.top.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
                if token == self.tokenizer.eos_token_id:
                    out.finish_reason = "stop"
                    break
                ids = torch.tensor([[token]])
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            return out


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    server_url: str
    time: float = field(default_factory=time.monotonic)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OpenAITestServer:
    """Serves one LocalLM over HTTP from a background thread; the test controls its faults."""

    def __init__(self, lm: LocalLM, host: str = "127.0.0.1", port: int = 0) -> None:
        self.lm = lm
        self.model_name = lm.name
        self.faults: deque[str] = deque()
        self.fail_all: str | None = None
        self.delay_s = 0.0  # added to every POST, so concurrent requests overlap measurably
        self.slow_s = 2.0
        self.retry_after = "0"
        self.error_message: str | None = None  # the body of the error faults; None: a stock text
        self.requests: list[RecordedRequest] = []
        self.reloads: list[tuple[str, str]] = []  # (model_path, weights digest after the reload)
        self.in_flight = 0
        self.max_in_flight = 0
        self.logprobs_mode = "raw"  # or "processed": the returned log-probs carry the logit_bias
        self.ignore_logit_bias = False
        self.tokenize = True  # serve /tokenize
        self.one_at_a_time = False  # queue requests and serve one at a time, as llama-cpp-python's server
        self._serial = threading.Lock()
        self._state = threading.Lock()
        self._count = 0
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True  # a "slow" handler must not hold up shutdown
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAITestServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"openai-test-{self.url}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test controls

    def add_faults(self, *faults: str) -> None:
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        with self._state:
            self.faults.extend(faults)

    def reset(self) -> None:
        with self._state:
            self.faults.clear()
            self.fail_all = None
            self.delay_s = 0.0
            self.requests.clear()
            self.in_flight = self.max_in_flight = 0
            self.logprobs_mode, self.ignore_logit_bias, self.tokenize = "raw", False, True
            self.one_at_a_time = False

    def posts(self) -> list[RecordedRequest]:
        with self._state:
            return [r for r in self.requests if r.method == "POST"]

    # ------------------------------------------------------------ used by the handler

    def _record(self, request: RecordedRequest) -> str | None:
        """Record a request; return the fault to apply to it, if any."""
        with self._state:
            self.requests.append(request)
            if request.method != "POST":
                return None
            if self.fail_all is not None:
                return self.fail_all
            return self.faults.popleft() if self.faults else None

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self._state:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._state:
                self.in_flight -= 1

    def _next_id(self) -> int:
        with self._state:
            self._count += 1
            return self._count

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            input_ids, prompt_chars = list(prompt), 0  # token ids, as vLLM takes them
            if max(input_ids) >= self.lm.vocab_size or min(input_ids) < 0:
                raise _BadRequest(400, "prompt token id out of the vocabulary")
        elif isinstance(prompt, str):
            input_ids, prompt_chars = self.lm.encode_prompt(prompt), len(prompt)
        else:
            raise _BadRequest(400, "prompt must be a string or a list of token ids")
        top_n = self._top_n(body.get("logprobs"))
        gen = self._generate(input_ids, body, top_n)
        logprobs = None
        if body.get("logprobs") is not None:
            if body.get("return_tokens_as_token_ids"):
                text = [f"token_id:{t}" for t in gen.token_ids]
            else:
                text = [self.lm.token_text[t] for t in gen.token_ids]
            offsets, at = [], prompt_chars
            for token in gen.token_ids:
                offsets.append(at)
                at += len(self.lm.token_text[token])
            logprobs = {
                "tokens": text,
                "token_logprobs": gen.logprobs,
                "top_logprobs": [self._top_dict(top) for top in gen.top],
                "text_offset": offsets,
            }
        choice: dict[str, Any] = {
            "index": 0,
            "text": gen.text,
            "logprobs": logprobs,
            "finish_reason": gen.finish_reason,
        }
        if body.get("return_token_ids"):  # vLLM's
            choice |= {"prompt_token_ids": input_ids, "token_ids": gen.token_ids}
        return self._envelope("cmpl", "text_completion", choice, gen)

    def update_weights_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's reload: 200 with success true, or 400 with success false and the reason."""
        path = body.get("model_path")
        if not isinstance(path, str) or not (Path(path) / "config.json").exists():
            raise _BadRequest(400, f"model_path {path!r} is not a model folder")
        try:
            digest = self.lm.load_weights(path)
        except (OSError, RuntimeError, ValueError) as e:
            raise _BadRequest(400, f"cannot load {path}: {e}") from None
        with self._state:
            self.reloads.append((path, digest))
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise _BadRequest(400, "messages must be a list of {role, content} objects")
        want = bool(body.get("logprobs"))
        top_n = self._top_n(body.get("top_logprobs", 0) if want else None)
        gen = self._generate(self.lm.encode_chat(messages), body, top_n)
        logprobs = None
        if want:
            content = []
            for token, logprob, top in zip(
                gen.token_ids, gen.logprobs, gen.top or [[]] * len(gen.token_ids), strict=True
            ):
                content.append(
                    {
                        **self._token_entry(token, logprob),
                        "top_logprobs": [self._token_entry(i, lp) for i, lp in top],
                    }
                )
            logprobs = {"content": content}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": logprobs,
            "finish_reason": gen.finish_reason,
        }
        return self._envelope("chatcmpl", "chat.completion", choice, gen)

    def _check_model(self, body: dict[str, Any]) -> None:
        if body.get("model") != self.model_name:
            raise _BadRequest(404, f"The model `{body.get('model')}` does not exist.")

    def _top_n(self, value: Any) -> int:
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _BadRequest(400, "logprobs must be a non-negative integer")
        if value > self.lm.vocab_size:
            raise _BadRequest(400, f"logprobs {value} exceeds the vocabulary size {self.lm.vocab_size}")
        return value

    def _generate(self, input_ids: list[int], body: dict[str, Any], top_n: int) -> Generation:
        max_tokens = body.get("max_tokens", 16)
        temperature = body.get("temperature", 1.0)
        seed = body.get("seed")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _BadRequest(400, "max_tokens must be a positive integer")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise _BadRequest(400, "temperature must be >= 0")
        bias = None
        if body.get("logit_bias") and not self.ignore_logit_bias:
            try:
                bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in body["logit_bias"].items()}
            except (AttributeError, TypeError, ValueError):
                raise _BadRequest(400, "logit_bias must map token ids to numbers") from None
            if any(not 0 <= i < self.lm.vocab_size for i in bias):
                raise _BadRequest(400, "logit_bias: token id out of the vocabulary")
        return self.lm.generate(input_ids, max_tokens, float(temperature), seed, top_n, bias,
                                self.logprobs_mode == "processed")  # fmt: skip

    def tokenize_text(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize: the prompt's ids as `completions` encodes it."""
        self._check_model(body)
        if not isinstance(body.get("prompt"), str):
            raise _BadRequest(400, "prompt must be a string")
        tokens = self.lm.encode_prompt(body["prompt"])
        return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        # The completions format maps text -> logprob; distinct ids with the same text are merged
        # (log-sum-exp) so no probability is lost.
        merged: dict[str, float] = {}
        for token, logprob in top:
            text = self.lm.token_text[token]
            merged[text] = _logaddexp(merged[text], logprob) if text in merged else logprob
        return merged

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.lm.token_text[token]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _envelope(self, prefix: str, kind: str, choice: dict[str, Any], gen: Generation) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{self._next_id()}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {"completion_tokens": len(gen.token_ids)},
        }


def _with_logprobs(reply: dict[str, Any], value: float | None) -> dict[str, Any]:
    """`reply` with every log-prob (completions and chat shapes) set to `value` (None: as it is)."""
    logprobs = reply["choices"][0].get("logprobs")
    if value is None or not logprobs:
        return reply
    if "content" in logprobs:  # chat
        for entry in logprobs["content"]:
            entry["logprob"] = value
            for top in entry["top_logprobs"]:
                top["logprob"] = value
    else:
        logprobs["token_logprobs"] = [value] * len(logprobs["token_logprobs"])
        logprobs["top_logprobs"] = [dict.fromkeys(top, value) for top in logprobs["top_logprobs"]]
    return reply


def _logaddexp(a: float, b: float) -> float:
    high = max(a, b)
    return high + math.log(math.exp(a - high) + math.exp(b - high))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    @property
    def owner(self) -> OpenAITestServer:
        return self.server.owner  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
        pass

    def do_GET(self) -> None:
        self.owner._record(RecordedRequest("GET", self.path, self._headers(), None, self.owner.url))
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.owner.model_name, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        fault = self.owner._record(RecordedRequest("POST", self.path, self._headers(), body, self.owner.url))
        serial = self.owner._serial if self.owner.one_at_a_time else contextlib.nullcontext()
        with self.owner._in_flight(), serial:
            if self.owner.delay_s:
                time.sleep(self.owner.delay_s)
            if fault is not None and self._apply_fault(fault):
                return
            self._serve(body, LOGPROB_FAULTS.get(fault or ""))

    def _apply_fault(self, fault: str) -> bool:
        """Fail this request as `fault` says; False when the request should still be served."""
        if fault == "429":
            self._error(429, "rate limit reached", {"Retry-After": self.owner.retry_after})
        elif fault in ("500", "503"):
            self._error(
                int(fault), self.owner.error_message or "the server had an error while processing the request"
            )
        elif fault == "400":
            self._error(400, self.owner.error_message or "invalid request")
        elif fault == "401":
            self._error(401, self.owner.error_message or "invalid api key")
        elif fault == "garbled":
            self._send(200, b'{"id": "cmpl-x", "choices": [{"text": "1", "logpr', "application/json")
        elif fault == "nologprobs":
            self._json(
                200, {"id": "cmpl-x", "object": "text_completion", "choices": [{"index": 0, "text": "1"}]}
            )
        elif fault == "drop":
            self.close_connection = True  # the handler returns without a byte written
        elif fault == "slow":
            time.sleep(self.owner.slow_s)
            return False
        elif fault in LOGPROB_FAULTS:
            return False  # served, with the log-probs replaced
        return True

    def _serve(self, body: Any, logprob: float | None = None) -> None:
        """Answer the request; with `logprob`, every log-prob in the reply is replaced by it."""
        if not isinstance(body, dict):
            self._error(400, "the request body is not a JSON object")
            return
        route = self.path.rstrip("/")
        try:
            if route == "/v1/completions":
                self._json(200, _with_logprobs(self.owner.completions(body), logprob))
            elif route == "/v1/chat/completions":
                self._json(200, _with_logprobs(self.owner.chat(body), logprob))
            elif route == "/update_weights_from_disk":
                self._json(200, self.owner.update_weights_from_disk(body))
            elif route == "/tokenize" and self.owner.tokenize:
                self._json(200, self.owner.tokenize_text(body))
            else:
                self._error(404, f"no route {self.path}")
        except _BadRequest as e:
            if route == "/update_weights_from_disk":  # SGLang's failure shape
                self._json(e.status, {"success": False, "message": e.message, "num_paused_requests": 0})
            else:
                self._error(e.status, e.message)

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        payload = {"error": {"message": message, "type": "error", "code": status}}
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a "slow" fault)
            self.close_connection = True


def main() -> None:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible server for a local causal LM (tests, demos)."
    )
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--name", default=None, help="the model name clients send (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = OpenAITestServer(LocalLM(args.model, args.name), args.host, args.port)
    print(f"serving {server.model_name} at {server.url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
