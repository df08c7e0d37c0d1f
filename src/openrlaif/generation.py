"""Sampling responses from a policy: the candidates the AI labeler judges, and RL's rollouts.

Two backends, picked by the config (`openrlaif generate`):

- in process (`policy:`): `transformers.generate` on a local folder or hub model. `sample()` is
  the same code as a plain function, for RL: it returns token ids as well as text, so the
  trainer can compute log-probabilities of exactly what was sampled;
- a server (`server:`): an OpenAI-compatible server (vLLM, SGLang, ...) for large models, through
  the judge's transport (`OpenAIClient`: bounded concurrency, retries, fleets, API key from the
  environment). One request per sample rather than `n` per prompt, so each sample has its own
  seed and a retry or a resume redoes just that one; vLLM's prefix cache shares the prompt's work.

RL's rollouts use both: `sample` in process (the K samples of a prompt share its encoding: one
forward over each distinct prompt, its KV cache copied to the K rows), or `sample_from_server`,
which sends the prompt as token ids to a server that reloads the policy's weights from disk
(`RolloutServerConfig`, `RolloutSampler`) and reads back the sampled token ids.

Reproducibility: every sample has its own seed, a hash of (seed, prompt id, sample index). In
process, each row of a batch draws its randomness from its own `torch.Generator`: generate runs
greedy over logits plus per-row Gumbel noise, and argmax(logits / T + Gumbel) is an exact sample
from softmax(logits / T) (the Gumbel-max trick). A shared generator (`do_sample=True`) would make a
row's sample depend on its neighbours in the batch. So a sample does not depend on the batch size,
on the other prompts, or on which samples a resumed run still has to make (up to floating-point
differences between batch shapes, which flip a token only at a near-exact tie). On a server the
derived seed goes in the request's `seed`.

Output: one JSONL row per sample, `id` = "<prompt id>-<k>", appended and fsynced per batch. A
killed job run again makes only the samples that are missing; raising `num_responses` later adds
only the new ones. `pairs_out` writes pairs of distinct responses per prompt, ready for
`openrlaif label`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import itertools
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from openrlaif.config import read_yaml
from openrlaif.data.chat import encode_prompt, to_messages, use_chat_template
from openrlaif.data.io import JsonlAppender, ReadResult, read_jsonl_dicts, read_prompts, write_records
from openrlaif.data.records import PromptRecord
from openrlaif.errors import ConfigError, OpenRLAIFError
from openrlaif.judges.openai_compat import OpenAIClient
from openrlaif.models.loading import load_causal_lm, resolve_device, resolve_dtype

PACKAGED_GENERATE_DIR = Path(__file__).parent / "configs" / "generate"


class GenerationError(OpenRLAIFError):
    """Sampling could not be done (a prompt too long for the model, an unreachable server, ...)."""


# ---------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ServerConfig(_Strict):
    """An OpenAI-compatible server (vLLM, SGLang, llama.cpp server, OpenAI) that samples."""

    model: str  # the name the server serves
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"], min_length=1)
    endpoint: Literal["completions", "chat"] = "completions"  # chat: the server's chat template
    api_key_env: str | None = "OPENAI_API_KEY"  # the *name* of the variable; the key is never stored
    concurrency: int = Field(32, ge=1)  # requests in flight; also 4x this many are written per chunk
    timeout_s: float = Field(300.0, gt=0)  # per request: a long response takes a while
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)


class RolloutServerConfig(ServerConfig):
    """RL rollouts from an OpenAI-compatible server. The policy changes every step, so every
    `sync_every` steps (and at the start of a run, resumed or not) the trainer saves it as a
    Hugging Face folder under `sync_dir` and POSTs `reload_body` to `reload_endpoint` at every
    server's root (the base URL without `/v1`); the default is SGLang's
    `POST /update_weights_from_disk {"model_path": ...}`. Prompts go as token ids (the trainer's
    encoding, chat template included) to `/completions`; the sampled token ids come back through
    vLLM's `return_token_ids` (or `return_tokens_as_token_ids` log-probs): text is never
    re-tokenised. The trainer computes the old-policy and reference log-probs itself."""

    sync_dir: str | None = None  # default: <output_dir>/rollout_policy; the servers must read this path
    # steps between weight syncs (> 1: rollouts from a policy up to sync_every - 1 steps old)
    sync_every: int = Field(1, ge=1)
    reload_endpoint: str = "/update_weights_from_disk"  # SGLang's
    # the JSON body of the reload request; "{path}" in a string becomes the saved folder's path
    reload_body: dict[str, Any] = Field(default_factory=lambda: {"model_path": "{path}"})
    reload_timeout_s: float = Field(600.0, gt=0)  # a large model takes a while to load

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


class GenerateConfig(_Strict):
    """`openrlaif generate`: N responses per prompt from `policy` (in process) or `server`."""

    policy: str | None = None  # Hugging Face model id or local folder, sampled in process
    server: ServerConfig | None = None  # ... or an OpenAI-compatible server
    prompts: str  # a .jsonl/.jsonl.gz/.parquet file (`prompt`, optional `id`) or "hh-harmless"
    limit: int | None = Field(None, ge=1)  # only the first N prompts
    skip_invalid: bool = False  # skip bad prompt rows (and report them) instead of stopping
    num_responses: int = Field(4, ge=1)  # N samples per prompt
    temperature: float = Field(0.9, ge=0.0)  # the RLAIF paper's sampling temperature; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)
    seed: int = 0
    # In process only:
    batch_size: int = Field(16, ge=1)  # sequences per generate call
    chat_template: Literal["auto", "on", "off"] = "auto"  # "auto": use it when the tokenizer has one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU, else fp32
    device: str = "auto"  # "auto" = cuda when available, else cpu
    revision: str | None = None
    trust_remote_code: bool = False
    # Output:
    out: str  # responses, .jsonl; re-running resumes
    pairs_out: str | None = None  # also write pairs of distinct responses (.jsonl or .parquet)
    pairs_per_prompt: int | None = Field(None, ge=1)  # None: all pairs; else that many, picked by seed

    @field_validator("out")
    @classmethod
    def _jsonl(cls, out: str) -> str:
        if not out.lower().endswith(".jsonl"):
            raise ValueError(f"must be a .jsonl file (it is appended to and resumed), got {out!r}")
        return out

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if (self.policy is None) == (self.server is None):
            raise ValueError("set exactly one of `policy` (sample in process) or `server` (an HTTP server)")
        if self.pairs_out is not None and self.num_responses < 2:
            raise ValueError("pairs_out needs num_responses >= 2")
        return self

    @property
    def policy_name(self) -> str:
        return self.policy if self.policy is not None else self.server.model  # type: ignore[union-attr]


def load_generate_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> GenerateConfig:
    """A YAML file (a path, or the name of a shipped one) with `overrides` on top (CLI flags)."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        file = Path(path)
        if not file.exists() and (PACKAGED_GENERATE_DIR / f"{path.removesuffix('.yaml')}.yaml").exists():
            file = PACKAGED_GENERATE_DIR / f"{path.removesuffix('.yaml')}.yaml"
        loaded = read_yaml(file)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of settings, got {type(loaded).__name__}")
        data, source = dict(loaded or {}), str(file)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])  # empty for a check across settings
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{message}{more}") from None


# ---------------------------------------------------------------- prompts and seeds


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of one sample: a hash of (seed, prompt key, sample index), below 2**31 so every
    server accepts it."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def load_prompts(
    source: str, skip_invalid: bool = False, limit: int | None = None
) -> ReadResult[PromptRecord]:
    """A prompts file, or a built-in dataset's prompts (ids like "hh-harmless-12")."""
    from openrlaif.data.datasets import BUILTIN_DATASETS, load_pairs

    if source in BUILTIN_DATASETS:
        # The few source rows the loader leaves out are a documented property of the shipped
        # file, not invalid input of the user's, so they are not reported as skipped.
        pairs = load_pairs(source)
        result = ReadResult([PromptRecord(p.id, p.prompt) for p in pairs.records])
    elif Path(source).exists():
        result = read_prompts(source, skip_invalid=skip_invalid)
    else:
        names = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigError(f"prompts: {source!r} is neither a file nor a built-in dataset ({names})")
    if limit is not None:
        result.records = result.records[:limit]
    return result


# ---------------------------------------------------------------- in process


class Sample(NamedTuple):
    """One response. `response_ids` ends with the EOS token when the model stopped (the EOS is an
    action RL must credit); it is cut at `max_new_tokens` otherwise."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str  # decoded without special tokens, stripped
    # a server's log-probs of the response tokens, when it sent them (RL checks its weights with them)
    sampler_logprobs: list[float] | None = None


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a response: the model's generation config may list several (Llama 3
    ends turns with <|eot_id|>), plus the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    if not found:
        raise GenerationError("the policy has no EOS token: set eos_token_id in its generation_config.json")
    return found


def finish_reason(response_ids: Sequence[int], eos_ids: set[int]) -> str:
    return "stop" if response_ids and response_ids[-1] in eos_ids else "length"


def _max_positions(model: Any) -> int | None:
    config = model.config.get_text_config(decoder=True)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    return min((x for x in limits if isinstance(x, int) and x > 0), default=None)


class _RowNoise:
    """A logits processor: adds Gumbel noise drawn from each row's own generator. Greedy decoding
    over the result samples every row from softmax(scores) with its own randomness.

    The noise for up to `steps_ahead` steps is drawn at once per row (at most `ROW_BUDGET` values,
    so a large vocabulary draws fewer steps ahead): one draw of (steps, vocab) from a CPU generator
    gives the same numbers, in the same order, as one draw per step, and it saves a handful of
    small operations per row and step in the decoding loop. The block depends on the vocabulary
    and `max_new_tokens` only, never on the batch."""

    ROW_BUDGET = 1 << 18  # noise values drawn ahead per row (1 MiB of float32)

    def __init__(self, seeds: Sequence[int], steps_ahead: int = 1) -> None:
        self.seeds = list(seeds)
        self.steps_ahead = max(1, steps_ahead)
        self.generators: list[Any] = []
        self.noise: Any = None  # (rows, block, vocab) Gumbel noise
        self.step = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:  # made where the logits are (a model split over GPUs ends on the last)
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        vocab = scores.shape[-1]
        block = min(self.steps_ahead, max(1, self.ROW_BUDGET // vocab))
        if self.step % block == 0:
            uniform = torch.stack(
                [torch.rand((block, vocab), generator=g, device=scores.device) for g in self.generators]
            )
            self.noise = -torch.log(-torch.log(uniform))  # u = 0 gives -inf: never picked
        noise = self.noise[:, self.step % block]
        self.step += 1
        return scores.float() + noise


def sampling_processors(temperature: float, top_p: float, seeds: Sequence[int], steps_ahead: int = 1) -> Any:
    """What turns generate's greedy decoding into sampling: temperature, top-p, then per-row
    noise (drawn `steps_ahead` decoding steps at a time, see `_RowNoise`). None at temperature 0
    (plain greedy)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if temperature == 0:
        return None
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(_RowNoise(seeds, steps_ahead))
    return processors


@contextmanager
def _blank_generation_config(model: Any) -> Iterator[None]:
    """generate() fills every setting we leave unset from `model.generation_config`, so a shipped
    repetition penalty, top_k or bad_words_ids would change the distribution sampled from (and RL
    needs the policy's own). Swap in a blank one for the call; eval mode too (no dropout)."""
    from transformers import GenerationConfig

    saved, training = model.generation_config, model.training
    model.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(training)


def shared_prompt_cache(model: Any, ids: Any, mask: Any, prompts: Sequence[Sequence[int]]) -> Any:
    """Samples of the same prompt (RL's K per prompt) share the prompt's work: each distinct prompt
    of the batch is encoded once, all but its last token (generate runs that one), and its KV
    cache is copied to each of its rows. None when no prompt repeats, or for a model whose cache
    is not a plain `DynamicCache` (generate then encodes every row)."""
    import torch
    from transformers import DynamicCache

    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    if len(first) == len(prompts) or ids.shape[1] < 2:
        return None
    representative = torch.tensor([index.index(u) for u in range(len(first))], device=ids.device)
    sub_ids, sub_mask = ids[representative, :-1], mask[representative, :-1]
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(
        input_ids=sub_ids, attention_mask=sub_mask, position_ids=(sub_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True, **kwargs,
    )  # fmt: skip
    cache = out.past_key_values
    if type(cache) is not DynamicCache:
        return None
    cache.batch_select_indices(torch.tensor(index, device=ids.device))
    return cache


def iter_samples(
    model: Any, tokenizer: Any, rows: Sequence[tuple[list[int], int]], temperature: float, max_new_tokens: int,
    top_p: float = 1.0, batch_size: int = 16,
) -> Iterator[list[tuple[int, Sample]]]:  # fmt: skip
    """Sample one response per row (prompt ids, seed), a batch at a time; yields (row index,
    sample) for each batch. Longest prompts go first, so running out of memory happens at once."""
    import torch
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = model.device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos),
        pad_token_id=pad,
    )
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    with _blank_generation_config(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(rows[i][0]) for i in batch)
            # Left padding: every row's prompt ends at the same position, where generation starts.
            ids = torch.tensor([[pad] * (width - len(rows[i][0])) + rows[i][0] for i in batch], device=device)
            mask = torch.tensor(
                [[0] * (width - len(rows[i][0])) + [1] * len(rows[i][0]) for i in batch], device=device
            )
            processors = sampling_processors(temperature, top_p, [rows[i][1] for i in batch], max_new_tokens)
            cache = shared_prompt_cache(model, ids, mask, [rows[i][0] for i in batch])
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors,
                **({"past_key_values": cache} if cache is not None else {}),
            )  # fmt: skip
            responses = []
            for generated in out[:, width:].tolist():
                stop = next((k + 1 for k, t in enumerate(generated) if t in eos), len(generated))
                responses.append(generated[:stop])  # up to the EOS; pads after it dropped
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            yield [
                (i, Sample(rows[i][0], response, text.strip()))
                for i, response, text in zip(batch, responses, texts, strict=True)
            ]


def prepare_rows(
    model: Any, tokenizer: Any, prompts: Sequence[str], keys: Sequence[str], indices: Sequence[int],
    seed: int, max_new_tokens: int, chat_template: str = "auto",
) -> list[tuple[list[int], int]]:  # fmt: skip
    """(prompt ids, sample seed) per requested sample; a prompt the model has no room for is an error."""
    chat = use_chat_template(tokenizer, chat_template)
    limit = _max_positions(model)
    encoded: dict[str, list[int]] = {}  # each prompt is encoded once, not once per sample
    rows = []
    for prompt, key, index in zip(prompts, keys, indices, strict=True):
        if prompt not in encoded:
            encoded[prompt] = encode_prompt(tokenizer, prompt, chat)
            if limit is not None and len(encoded[prompt]) + max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {key!r} is {len(encoded[prompt])} tokens; with max_new_tokens={max_new_tokens} "
                    f"it exceeds the policy's {limit} positions: lower max_new_tokens or shorten the prompt"
                )
        rows.append((encoded[prompt], sample_seed(seed, key, index)))
    return rows


def sample(
    model: Any, tokenizer: Any, prompts: Sequence[str], n: int = 4, temperature: float = 0.9,
    max_new_tokens: int = 128, *, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
    chat_template: Literal["auto", "on", "off"] = "auto", keys: Sequence[str] | None = None,
) -> list[Sample]:  # fmt: skip
    """`n` samples per prompt, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].

    Sample k of a prompt is seeded by (seed, key, k), where the key is the prompt's position in
    `prompts` unless `keys` gives ids; the same arguments give the same samples whatever the
    `batch_size`. RL passes a new `seed` each step.
    """
    keys = [str(i) for i in range(len(prompts))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    repeated = [(p, k, i) for p, k in zip(prompts, keys, strict=True) for i in range(n)]
    rows = prepare_rows(
        model, tokenizer, [r[0] for r in repeated], [r[1] for r in repeated], [r[2] for r in repeated],
        seed, max_new_tokens, chat_template,
    )  # fmt: skip
    samples: list[Sample | None] = [None] * len(rows)
    for batch in iter_samples(model, tokenizer, rows, temperature, max_new_tokens, top_p, batch_size):
        for i, s in batch:
            samples[i] = s
    return samples  # type: ignore[return-value] - every row was filled


# ---------------------------------------------------------------- server


@dataclass
class ServerSample:
    text: str
    finish_reason: str
    num_tokens: int | None  # from the reply's usage, when the server reports it


class ServerSampler(OpenAIClient):
    """Samples through an OpenAI-compatible server: one request per sample, with its seed."""

    client_name: ClassVar[str] = "generation server"
    error_type: ClassVar[type[OpenRLAIFError]] = GenerationError
    bad_request_hint: ClassVar[str] = (
        " (check max_new_tokens against the model's context, e.g. vLLM --max-model-len)"
    )

    def __init__(self, config: ServerConfig, temperature: float, top_p: float, max_new_tokens: int) -> None:
        super().__init__(config)
        self.config: ServerConfig = config
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens}

    def sample(self, items: Sequence[tuple[str, int]]) -> list[ServerSample]:
        """One sample per (prompt, seed), in order, requests running concurrently."""
        return self._run(self._all([self._one(prompt, seed) for prompt, seed in items]))

    async def _one(self, prompt: str, seed: int) -> ServerSample:
        body: dict[str, Any] = {"model": self.config.model, **self.sampling, "seed": seed}
        if self.config.endpoint == "completions":
            return await self._post("/completions", {**body, "prompt": prompt}, _read_sample)
        return await self._post("/chat/completions", {**body, "messages": to_messages(prompt)}, _read_sample)


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
        self.config: RolloutServerConfig = config

    def sample_tokens(self, items: Sequence[tuple[list[int], int]]) -> list[TokenSample]:
        """One sample per (prompt token ids, seed), in order, requests running concurrently."""
        return self._run(self._all([self._one_tokens(ids, seed) for ids, seed in items]))

    async def _one_tokens(self, prompt_ids: list[int], seed: int) -> TokenSample:
        body = {
            "model": self.config.model, **self.sampling, "seed": seed, "prompt": prompt_ids,
            # vLLM: the sampled ids (`return_token_ids`, or the log-probs' tokens as "token_id:N"), and
            # the sampled token's log-prob (a check that the server serves the trainer's weights)
            "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        return await self._post("/completions", body, _read_token_sample)

    def reload_weights(self, path: Path) -> None:
        """Every server (all of `base_urls`) loads the policy saved in `path`."""
        self._run(self._all([self._reload(server.url, path) for server in self.servers]))

    async def _reload(self, base_url: str, path: Path) -> None:
        assert self._client is not None  # made by _run
        url = base_url.removesuffix("/v1") + self.config.reload_endpoint
        body = _fill_path(self.config.reload_body, str(path.resolve()))
        timeout = self.config.reload_timeout_s
        try:
            request = self._client.post(url, json=body, headers=self._headers(), timeout=timeout)
            response = await asyncio.wait_for(request, timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise self._error(
                f"{url}: no answer to the weight reload within reload_timeout_s={timeout:g}"
            ) from None
        except httpx.RequestError as e:
            raise self._error(f"{url}: the weight reload failed ({type(e).__name__}: {e})") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        failed = isinstance(data, dict) and data.get("success") is False  # SGLang answers 200/400 with it
        if response.status_code != 200 or failed:
            explanation = (
                data.get("message") if isinstance(data, dict) and data.get("message") else response.text
            )
            raise self._error(
                f"{url} did not reload the weights from {path} (HTTP {response.status_code}: "
                f"{self._clean(str(explanation))}); check reload_endpoint/reload_body and that the server "
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
    server: RolloutSampler, model: Any, tokenizer: Any, prompts: Sequence[str], n: int, *, seed: int,
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
    samples = []
    for (prompt_ids, _), got in zip(rows, server.sample_tokens(rows), strict=True):
        response, logprobs = got.token_ids[:max_new_tokens], got.logprobs
        if got.finish_reason == "stop" and (not response or response[-1] not in eos):
            response = [*response, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos)]
            logprobs = None  # no log-prob for the EOS the server left out
        if logprobs is not None:
            logprobs = logprobs[: len(response)]
        text = tokenizer.decode(response, skip_special_tokens=True).strip()
        samples.append(Sample(list(prompt_ids), response, text, logprobs))
    return samples


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
    return ServerSample(text.strip(), str(choice.get("finish_reason") or "unknown"), tokens)


# ---------------------------------------------------------------- the job


@dataclass
class GenerateResult:
    out: str
    prompts: int
    samples: int  # prompts x num_responses
    resumed: int  # samples found already in the output and kept
    written: int  # samples made by this run
    seconds: float
    pairs_out: str | None = None
    pairs: int = 0
    skipped_invalid: list[str] = field(default_factory=list)
    server_stats: dict[str, Any] | None = None


def generate(config: GenerateConfig, show_progress: bool = True) -> GenerateResult:
    """Run `openrlaif generate`: sample what is missing from `config.out`, then write `pairs_out`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.perf_counter()
    read = load_prompts(config.prompts, config.skip_invalid, config.limit)
    prompts, n = read.records, config.num_responses
    out = Path(config.out)
    result = GenerateResult(
        out=str(out), prompts=len(prompts), samples=len(prompts) * n, resumed=0, written=0, seconds=0.0,
        skipped_invalid=read.skipped,
    )  # fmt: skip
    with JsonlAppender(out) as appender:
        _check_same_policy(out, config.policy_name, bool(appender.done_ids))
        todo = [(p, k) for p in prompts for k in range(n) if f"{p.id}-{k}" not in appender.done_ids]
        result.resumed, result.written = result.samples - len(todo), len(todo)
        server = None
        if config.server is not None and todo:
            server = ServerSampler(config.server, config.temperature, config.top_p, config.max_new_tokens)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, disable=not show_progress, transient=True) as progress:
                task = progress.add_task(
                    f"sampling {config.policy_name}", total=result.samples, completed=result.resumed
                )
                for rows in _server_rows(server, config, todo) if server else _local_rows(config, todo):
                    appender.write(rows)
                    progress.advance(task, len(rows))
        finally:
            if server is not None:
                result.server_stats = server.stats()
                server.close()
    if config.pairs_out is not None:
        pairs = build_pairs(read_jsonl_dicts(out), prompts, n, config.pairs_per_prompt, config.seed)
        write_records(config.pairs_out, pairs)
        result.pairs_out, result.pairs = config.pairs_out, len(pairs)
    result.seconds = time.perf_counter() - start
    return result


def _check_same_policy(out: Path, policy: str, has_rows: bool) -> None:
    """Resuming must not mix two policies' samples in one file."""
    if not has_rows:
        return
    for row in read_jsonl_dicts(out):
        if row.get("policy") != policy:
            raise ConfigError(
                f"{out}: already holds samples from policy {row.get('policy')!r}, not {policy!r}; "
                "pick another out or move the file away"
            )


def _response_row(
    p: PromptRecord, k: int, policy: str, text: str, tokens: int | None, reason: str
) -> dict[str, Any]:
    return {
        "id": f"{p.id}-{k}", "prompt_id": p.id, "prompt": p.prompt, "response": text, "sample_index": k,
        "policy": policy, "num_tokens": tokens, "finish_reason": reason,
    }  # fmt: skip


def _server_rows(
    server: ServerSampler, config: GenerateConfig, todo: list[tuple[PromptRecord, int]]
) -> Iterator[list[dict[str, Any]]]:
    chunk = 4 * server.config.concurrency  # enough to keep every slot busy between writes
    for begin in range(0, len(todo), chunk):
        part = todo[begin : begin + chunk]
        got = server.sample([(p.prompt, sample_seed(config.seed, p.id, k)) for p, k in part])
        yield [
            _response_row(p, k, config.policy_name, s.text, s.num_tokens, s.finish_reason)
            for (p, k), s in zip(part, got, strict=True)
        ]


def _local_rows(
    config: GenerateConfig, todo: list[tuple[PromptRecord, int]]
) -> Iterator[list[dict[str, Any]]]:
    if not todo:  # nothing missing: do not even load the model
        return
    device = resolve_device(config.device)
    tokenizer, model = load_causal_lm(
        config.policy_name, device, resolve_dtype(config.dtype, device), config.revision,
        config.trust_remote_code, what="generate", setting="policy",
    )  # fmt: skip
    eos = eos_token_ids(model, tokenizer)
    rows = prepare_rows(
        model, tokenizer, [p.prompt for p, _ in todo], [p.id for p, _ in todo], [k for _, k in todo],
        config.seed, config.max_new_tokens, config.chat_template,
    )  # fmt: skip
    settings = (config.temperature, config.max_new_tokens, config.top_p, config.batch_size)
    for batch in iter_samples(model, tokenizer, rows, *settings):
        yield [
            _response_row(todo[i][0], todo[i][1], config.policy_name, s.response_text, len(s.response_ids),
                          finish_reason(s.response_ids, eos))
            for i, s in batch
        ]  # fmt: skip


def build_pairs(
    rows: Sequence[dict[str, Any]], prompts: Sequence[PromptRecord], n: int, per_prompt: int | None, seed: int
) -> list[dict[str, Any]]:
    """Pairs of distinct, non-empty responses per prompt, in the pairs format `openrlaif label`
    reads. Identical texts count once (the lowest sample index); with `per_prompt`, that many
    pairs are drawn at random (seeded per prompt) from all of them."""
    by_prompt: dict[str, dict[int, str]] = {}
    for row in rows:
        if 0 <= row["sample_index"] < n:
            by_prompt.setdefault(row["prompt_id"], {})[row["sample_index"]] = row["response"]
    pairs = []
    for p in prompts:
        distinct: dict[str, int] = {}
        for k, text in sorted(by_prompt.get(p.id, {}).items()):
            if text.strip():
                distinct.setdefault(text, k)
        combos = list(itertools.combinations(sorted(distinct.values()), 2))
        if per_prompt is not None and len(combos) > per_prompt:
            combos = sorted(random.Random(f"{seed}:{p.id}").sample(combos, per_prompt))
        texts = by_prompt.get(p.id, {})
        pairs += [
            {"id": f"{p.id}-{i}-{j}", "prompt": p.prompt, "response_a": texts[i], "response_b": texts[j]}
            for i, j in combos
        ]
    return pairs


# ---------------------------------------------------------------- command line


def add_generate_command(subparsers: Any) -> argparse.ArgumentParser:
    """`openrlaif generate`: the config file's settings, with flags on top."""
    p = subparsers.add_parser(
        "generate", help="sample N responses per prompt from a policy (candidates to label)"
    )
    p.add_argument(
        "--config", default=None, help="generate config YAML, or a shipped one's name (generate-tiny)"
    )
    p.add_argument("--policy", default=None, help="model folder or Hugging Face id, sampled in process")
    p.add_argument("--prompts", default=None, help="prompts file (prompt + optional id) or hh-harmless")
    p.add_argument("--out", default=None, help="responses output (.jsonl); re-running resumes")
    p.add_argument(
        "--pairs-out", default=None, help="also write pairs of distinct responses (.jsonl/.parquet)"
    )
    p.add_argument("-n", "--num-responses", type=int, default=None, help="samples per prompt (default: 4)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest response (default: 128)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per generate call (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--skip-invalid", action="store_true", default=None, help="skip bad prompt rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    names = ("policy", "prompts", "out", "pairs_out", "num_responses", "temperature", "max_new_tokens",
             "seed", "batch_size", "limit", "skip_invalid")  # fmt: skip
    config = load_generate_config(args.config, {name: getattr(args, name) for name in names})
    result = generate(config, show_progress=not args.quiet)
    if result.skipped_invalid:
        print(f"skipped {len(result.skipped_invalid)} invalid row(s); first: {result.skipped_invalid[0]}")
    print(
        f"generated: {result.prompts} prompts x {config.num_responses} -> {result.out} ({result.written} new, "
        f"{result.resumed} already done); {result.seconds:.1f}s"
    )
    if result.pairs_out is not None:
        print(f"pairs: {result.pairs} -> {result.pairs_out} (label them with `openrlaif label --pairs ...`)")
    for url, st in (result.server_stats or {}).get("servers", {}).items():
        print(f"  {url}: {st['requests']} requests, {st['retries']} retries, {st['failures']} failures")
    return 0
