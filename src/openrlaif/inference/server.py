"""Sampling through an OpenAI-compatible server (vLLM, SGLang, ...), for large models and RL.

`ServerSampler` (`openrlaif generate`'s `server:`) sends one request per sample rather than `n`
per prompt, so each sample has its own seed (`local.sample_seed`) and a retry or a resume redoes
just that one; vLLM's prefix cache shares the prompt's work. `RolloutSampler` (RL's
`rollout_server:`) sends the prompt as token ids (the trainer's encoding) and reads back the
sampled token ids, and makes every server reload the policy's weights from disk
(`reload_weights`), so the server samples from the policy being trained; `sample_from_server` is
`local.sample` through it. A server that takes no token ids and returns none (llama.cpp's) is
used with `tokens: text`: the prompt goes as text and the sampled text is re-tokenised by the
trainer's tokenizer; one that cannot load new weights is restarted on them by openrlaif
(`reload: llama_cpp`: llama.cpp's server run as a child process, the policy written as GGUF).

Both hold an `inference.http.OpenAIClient` for the transport: bounded concurrency, retries,
fleets, the API key from the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, field_validator, model_validator

from openrlaif.config import StrictModel
from openrlaif.data.chat import prompt_text, to_messages
from openrlaif.data.records import Prompt
from openrlaif.errors import GenerationError
from openrlaif.inference.http import OpenAIClient
from openrlaif.inference.llama_cpp import LlamaCppServer
from openrlaif.inference.local import Sample, eos_token_ids, prepare_rows
from openrlaif.models.gguf import source_gguf, write_gguf
from openrlaif.models.names import models_dir

# ---------------------------------------------------------------- config


class ServerConfig(StrictModel):
    """An OpenAI-compatible server (vLLM, SGLang, llama.cpp server, OpenAI) that samples."""

    model: str  # the name the server serves
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"], min_length=1)
    endpoint: Literal["completions", "chat"] = "completions"  # chat: the server's chat template
    api_key_env: str | None = "OPENAI_API_KEY"  # the *name* of the variable; the key is never stored
    concurrency: int = Field(default=32, ge=1)  # requests in flight; also 4x this many are written per chunk
    timeout_s: float = Field(default=300.0, gt=0)  # per request: a long response takes a while
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)


class RolloutServerConfig(ServerConfig):
    """RL rollouts from an OpenAI-compatible server. The policy changes every step, so every
    `sync_every` steps (and at the start of a run, resumed or not) the trainer saves it as a
    Hugging Face folder under `sync_dir` and has every server load it:

    - `reload: endpoint` (vLLM, SGLang): POSTs `reload_body` to `reload_endpoint` at every server's
      root (the base URL without `/v1`); the default is SGLang's
      `POST /update_weights_from_disk {"model_path": ...}`.
    - `reload: llama_cpp`: llama.cpp's server has no such endpoint, so openrlaif runs it itself
      (`llama-cpp-python[server]`, one process per base URL, which must be on this machine) and
      restarts it on the policy written as a GGUF file (`gguf_type`), whose metadata (tokenizer,
      chat template) comes from the GGUF file the policy was trained from (`gguf_like`).

    `tokens: ids` (vLLM, SGLang): prompts go as token ids (the trainer's encoding, chat template
    included) to `/completions`; the sampled ids come back through vLLM's `return_token_ids` (or
    `return_tokens_as_token_ids` log-probs): text is never re-tokenised. `tokens: text` (llama.cpp,
    servers that take text only): the prompt goes as the text of the trainer's encoding, and the
    sampled text is re-tokenised by the trainer's tokenizer, which can split it differently from
    the tokens the server sampled (the trainer's log-probs are of its own split). The trainer
    computes the old-policy and reference log-probs itself either way."""

    sync_dir: str | None = None  # default: <output_dir>/rollout_policy; the servers must read this path
    # steps between weight syncs (> 1: rollouts from a policy up to sync_every - 1 steps old)
    sync_every: int = Field(default=1, ge=1)
    reload_endpoint: str = "/update_weights_from_disk"  # SGLang's
    # the JSON body of the reload request; "{path}" in a string becomes the saved folder's path
    reload_body: dict[str, Any] = Field(default_factory=lambda: {"model_path": "{path}"})
    reload_timeout_s: float = Field(default=600.0, gt=0)  # a large model takes a while to load
    tokens: Literal["ids", "text"] = "ids"  # text: for servers without token-id prompts (llama.cpp)
    reload: Literal["endpoint", "llama_cpp"] = "endpoint"
    gguf_like: str | None = (
        None  # reload llama_cpp: the GGUF model the policy came from (gguf:/path, packaged:...)
    )
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"  # reload llama_cpp: the policy's matrices
    llama_cpp_args: list[str] = Field(default_factory=list)  # reload llama_cpp: more server settings

    @model_validator(mode="after")
    def _llama_cpp(self) -> RolloutServerConfig:
        if self.reload == "llama_cpp":
            if self.tokens != "text":
                raise ValueError(
                    "reload llama_cpp needs `tokens: text`: llama.cpp's server takes no token ids"
                )
            if self.gguf_like is None:
                raise ValueError(
                    "reload llama_cpp needs `gguf_like`: the GGUF model the policy was trained from "
                    "(e.g. packaged:gemma-3-270m), whose tokenizer and metadata the policy's GGUF file copies"
                )
            for url in self.base_urls:
                parsed = httpx.URL(url)
                if parsed.host not in ("127.0.0.1", "localhost") or parsed.port is None:
                    raise ValueError(
                        f"reload llama_cpp runs the servers here: {url} must be http://127.0.0.1:PORT/v1"
                    )
        return self

    @field_validator("endpoint")
    @classmethod
    def _completions(cls, endpoint: str) -> str:
        if endpoint != "completions":
            raise ValueError("RL rollouts send token ids, which only the completions endpoint takes")
        return endpoint

    @field_validator("reload_endpoint")
    @classmethod
    def _path(cls, endpoint: str) -> str:
        if not endpoint.startswith("/"):
            raise ValueError(f"must be a path at the server's root starting with '/', got {endpoint!r}")
        return endpoint


# ---------------------------------------------------------------- text samples (`openrlaif generate`)


@dataclass
class ServerSample:
    """One sampled response as text."""

    raw: str  # as the server sent it (RL re-tokenises this: a leading space is a token)
    finish_reason: str
    num_tokens: int | None  # from the reply's usage, when the server reports it

    @property
    def text(self) -> str:
        """The response without surrounding white space."""
        return self.raw.strip()


class ServerSampler:
    """Samples through an OpenAI-compatible server: one request per sample, with its seed. Its
    `client` holds the connections (`client.stats()`, `client.close()`)."""

    client_name: ClassVar[str] = "generation server"  # starts its error messages

    def __init__(self, config: ServerConfig, temperature: float, top_p: float, max_new_tokens: int) -> None:
        self.config = config
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens}
        self.client = OpenAIClient(
            config,
            name=self.client_name,
            error_type=GenerationError,
            bad_request_hint=" (check max_new_tokens against the model's context, e.g. vLLM --max-model-len)",
        )

    def sample(self, items: Sequence[tuple[Prompt, int]]) -> list[ServerSample]:
        """One sample per (prompt, seed), in order, requests running concurrently."""
        return self.client.run(self.client.gather([self._one(prompt, seed) for prompt, seed in items]))

    async def _one(self, prompt: Prompt, seed: int) -> ServerSample:
        body: dict[str, Any] = {"model": self.config.model, **self.sampling, "seed": seed}
        if self.config.endpoint == "completions":  # text in: a conversation as its text (`prompt_text`)
            return await self.client.post(
                "/completions", {**body, "prompt": prompt_text(prompt)}, _read_sample
            )
        messages = to_messages(prompt)
        return await self.client.post("/chat/completions", {**body, "messages": messages}, _read_sample)


def _read_sample(data: Any) -> ServerSample:
    """A completions or chat reply; a reply without text raises, and is retried like a 5xx."""
    choice = data["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    if text is None:  # some servers send null content for an empty reply
        text = ""
    if not isinstance(text, str):
        raise TypeError("the reply's text is not a string")
    usage = data.get("usage") or {}
    tokens = usage.get("completion_tokens")
    return ServerSample(text, str(choice.get("finish_reason") or "unknown"), tokens)


# ---------------------------------------------------------------- token samples and weight reload (RL)


@dataclass
class TokenSample:
    """A server's sample as token ids (and their log-probs under the server's weights, when sent)."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str


class RolloutSampler(ServerSampler):
    """RL's rollouts through a server: prompts as token ids in, sampled token ids out, and the
    weight reload that keeps the server's policy the trainer's."""

    client_name: ClassVar[str] = "rollout server"

    def __init__(
        self, config: RolloutServerConfig, temperature: float, top_p: float, max_new_tokens: int
    ) -> None:
        super().__init__(config, temperature, top_p, max_new_tokens)
        self.config: RolloutServerConfig = config  # the same object, typed with its reload settings
        self.llama_cpp: list[LlamaCppServer] = []  # reload llama_cpp: the servers openrlaif runs

    def close(self) -> None:
        """Stop the servers openrlaif started and close the connections."""
        for process in self.llama_cpp:
            process.stop()
        self.client.close()

    def sample_tokens(self, items: Sequence[tuple[list[int], int]]) -> list[TokenSample]:
        """One sample per (prompt token ids, seed), in order, requests running concurrently."""
        return self.client.run(self.client.gather([self._one_tokens(ids, seed) for ids, seed in items]))

    async def _one_tokens(self, prompt_ids: list[int], seed: int) -> TokenSample:
        body = {
            "model": self.config.model, **self.sampling, "seed": seed, "prompt": prompt_ids,
            # vLLM: the sampled ids (`return_token_ids`, or the log-probs' tokens as "token_id:N"), and
            # the sampled token's log-prob (a check that the server serves the trainer's weights)
            "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        return await self.client.post("/completions", body, _read_token_sample)

    def reload_weights(self, path: Path) -> None:
        """Every server (all of `base_urls`) loads the policy saved in `path`."""
        if self.config.reload == "llama_cpp":
            self._restart_llama_cpp(path)
            return
        urls = [server.url for server in self.client.servers]
        self.client.run(self.client.gather([self._reload(url, path) for url in urls]))

    def _restart_llama_cpp(self, path: Path) -> None:
        """The policy in `path` written as `path/policy.gguf`, every llama.cpp server (re)started on it."""
        assert self.config.gguf_like is not None  # the config's validator saw to it
        gguf = write_gguf(path, source_gguf(self.config.gguf_like, models_dir()), path / "policy.gguf",
                          self.config.gguf_type)  # fmt: skip
        if not self.llama_cpp:
            for i, url in enumerate(self.config.base_urls):
                port = httpx.URL(url).port
                assert port is not None
                self.llama_cpp.append(
                    LlamaCppServer(port, self.config.model, path.parent / f"llama_cpp.{i}.log",
                                   args=self.config.llama_cpp_args, startup_timeout_s=self.config.reload_timeout_s)
                )  # fmt: skip
        for process in self.llama_cpp:
            process.start(gguf)

    async def _reload(self, base_url: str, path: Path) -> None:
        url = base_url.removesuffix("/v1") + self.config.reload_endpoint
        body = _fill_path(self.config.reload_body, str(path.resolve()))
        timeout = self.config.reload_timeout_s
        try:
            response = await self.client.post_once(url, body, timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise self.client.error(
                f"{url}: no answer to the weight reload within reload_timeout_s={timeout:g}"
            ) from None
        except httpx.RequestError as e:
            raise self.client.error(f"{url}: the weight reload failed ({type(e).__name__}: {e})") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        failed = isinstance(data, dict) and data.get("success") is False  # SGLang answers 200/400 with it
        if response.status_code != 200 or failed:
            explanation = (
                data.get("message") if isinstance(data, dict) and data.get("message") else response.text
            )
            raise self.client.error(
                f"{url} did not reload the weights from {path} (HTTP {response.status_code}: "
                f"{self.client.clean(str(explanation))}); check reload_endpoint/reload_body and that the server "
                "can read sync_dir"
            )


def _fill_path(value: Any, path: str) -> Any:
    """`reload_body` with every "{path}" in its strings replaced by the folder."""
    if isinstance(value, str):
        return value.replace("{path}", path)
    if isinstance(value, dict):
        return {k: _fill_path(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_path(v, path) for v in value]
    return value


def _read_token_sample(data: Any) -> TokenSample:
    """A completions reply's token ids: `choices[0].token_ids` (vLLM's `return_token_ids`), else the
    log-probs' tokens when they read "token_id:N" (`return_tokens_as_token_ids`)."""
    choice = data["choices"][0]
    logprobs = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if (
        ids is None
        and logprobs.get("tokens")
        and all(str(t).startswith("token_id:") for t in logprobs["tokens"])
    ):
        ids = [int(str(t).removeprefix("token_id:")) for t in logprobs["tokens"]]
    if ids is None or not all(isinstance(t, int) for t in ids):
        raise _NoTokenIds("the reply has no token ids (the server must honour vLLM's return_token_ids)")
    values = logprobs.get("token_logprobs")
    values = [float(v) for v in values] if isinstance(values, list) and len(values) == len(ids) else None
    return TokenSample(list(ids), values, str(choice.get("finish_reason") or "unknown"))


class _NoTokenIds(ValueError):
    """A reply without token ids: unusable (retried like a 5xx, then reported)."""


def sample_from_server(
    server: RolloutSampler, model: Any, tokenizer: Any, prompts: Sequence[Prompt], n: int, *, seed: int,
    keys: Sequence[str], max_new_tokens: int, chat_template: Literal["auto", "on", "off"] = "auto",
) -> list[Sample]:  # fmt: skip
    """`sample` through a server: the same prompt encoding (here, by `model`'s tokenizer) and per-sample
    seeds, prompt-major. A response that stopped ("stop") is given the EOS it ended with when the
    server left it out: the EOS is an action the policy took."""
    repeated = [(p, k, i) for p, k in zip(prompts, keys, strict=True) for i in range(n)]
    rows = prepare_rows(
        model, tokenizer, [r[0] for r in repeated], [str(r[1]) for r in repeated], [r[2] for r in repeated],
        seed, max_new_tokens, chat_template,
    )  # fmt: skip
    eos = eos_token_ids(model, tokenizer)
    if server.config.tokens == "text":
        replies = [_retokenised(got, tokenizer) for got in server.sample([(_prompt_text(tokenizer, ids), seed)
                                                                          for ids, seed in rows])]  # fmt: skip
    else:
        replies = server.sample_tokens(rows)
    samples = []
    for (prompt_ids, _), got in zip(rows, replies, strict=True):
        response, logprobs = got.token_ids[:max_new_tokens], got.logprobs
        if got.finish_reason == "stop" and (not response or response[-1] not in eos):
            response = [*response, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos)]
            logprobs = None  # no log-prob for the EOS the server left out
        if logprobs is not None:
            logprobs = logprobs[: len(response)]
        text = tokenizer.decode(response, skip_special_tokens=True).strip()
        samples.append(Sample(list(prompt_ids), response, text, logprobs))
    return samples


def _prompt_text(tokenizer: Any, prompt_ids: list[int]) -> str:
    """The text a text-only server is sent for the trainer's encoding of a prompt: its special
    tokens (a chat template's) kept, its leading BOS dropped (the server adds its own)."""
    if prompt_ids and tokenizer.bos_token_id is not None and prompt_ids[0] == tokenizer.bos_token_id:
        prompt_ids = prompt_ids[1:]
    return str(tokenizer.decode(prompt_ids, skip_special_tokens=False))


def _retokenised(got: ServerSample, tokenizer: Any) -> TokenSample:
    """A text reply as the trainer's tokens (no server log-probs: they are of the server's split)."""
    ids = tokenizer(got.raw, add_special_tokens=False)["input_ids"]
    return TokenSample(list(ids), None, got.finish_reason)
