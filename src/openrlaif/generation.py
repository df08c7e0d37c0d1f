"""`openrlaif generate`: N responses per prompt from a policy, the candidates the AI labeler judges.

Two backends, picked by the config: in process (`policy:`, `inference.local`: transformers on a
local folder or hub model) or a server (`server:`, `inference.server.ServerSampler`: an
OpenAI-compatible server such as vLLM or SGLang, for large models). Every sample has its own seed,
a hash of (seed, prompt id, sample index) (`inference.local.sample_seed`), so a sample does not
depend on the batch, the other prompts or a resume.

Output: one JSONL row per sample, `id` = "<prompt id>-<k>", appended and fsynced per batch, in
the prompts' format (a conversational prompt's `response` is a list of one assistant message). A
killed job run again makes only the samples that are missing; raising `num_responses` later adds
only the new ones. `pairs_out` writes pairs of distinct responses per prompt, ready for
`openrlaif label`.
"""

from __future__ import annotations

import functools
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from openrlaif.config import StrictModel, apply_overrides, format_validation_error, read_yaml
from openrlaif.data.datasets import load_prompts
from openrlaif.data.io import JsonlAppender, read_jsonl_dicts, write_records
from openrlaif.data.records import PromptRecord, prompt_json, response_from_json, response_json
from openrlaif.errors import ConfigError
from openrlaif.inference.local import eos_token_ids, finish_reason, iter_samples, prepare_rows, sample_seed
from openrlaif.inference.server import ServerConfig, ServerSampler
from openrlaif.models.loading import load_causal_lm, resolve_device
from openrlaif.models.precision import choose_precision

PACKAGED_GENERATE_DIR = Path(__file__).parent / "configs" / "generate"


# ---------------------------------------------------------------- config


class GenerateConfig(StrictModel):
    """`openrlaif generate`: N responses per prompt from `policy` (in process) or `server`."""

    policy: str | None = None  # Hugging Face model id or local folder, sampled in process
    server: ServerConfig | None = None  # ... or an OpenAI-compatible server
    prompts: str  # a .jsonl/.jsonl.gz/.parquet file (`prompt`, optional `id`) or "hh-harmless"
    limit: int | None = Field(default=None, ge=1)  # only the first N prompts
    skip_invalid: bool = False  # skip bad prompt rows (and report them) instead of stopping
    num_responses: int = Field(default=4, ge=1)  # N samples per prompt
    temperature: float = Field(default=0.9, ge=0.0)  # the RLAIF paper's sampling temperature; 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1)
    seed: int = 0
    # In process only:
    batch_size: int = Field(default=16, ge=1)  # sequences per generate call
    chat_template: Literal["auto", "on", "off"] = "auto"  # "auto": use it when the tokenizer has one
    # the weights' dtype; auto: bf16 where the hardware runs it natively, else float32 (models/precision.py)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    revision: str | None = None
    trust_remote_code: bool = False
    # Output:
    out: str  # responses, .jsonl; re-running resumes
    pairs_out: str | None = None  # also write pairs of distinct responses (.jsonl or .parquet)
    pairs_per_prompt: int | None = Field(
        default=None, ge=1
    )  # None: all pairs; else that many, picked by seed

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


def load_generate_config(
    path: str | None = None, overrides: dict[str, Any] | None = None, sets: Mapping[str, Any] | None = None
) -> GenerateConfig:
    """A YAML file (a path, or the name of a shipped one) with the CLI's flags (`overrides`, None:
    not given) and then its `--set a.b=VALUE` items (`sets`, from `config.parse_set_overrides`) on top."""
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
    apply_overrides(data, sets or {})
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


# ---------------------------------------------------------------- prompts


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
                say = (
                    functools.partial(progress.console.print, highlight=False, soft_wrap=True)
                    if show_progress
                    else None
                )
                for rows in _server_rows(server, config, todo) if server else _local_rows(config, todo, say):
                    appender.write(rows)
                    progress.advance(task, len(rows))
        finally:
            if server is not None:
                result.server_stats = server.client.stats()
                server.client.close()
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
        "id": f"{p.id}-{k}", "prompt_id": p.id, "prompt": prompt_json(p.prompt),
        "response": response_json(p.prompt, text), "sample_index": k,
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
    config: GenerateConfig, todo: list[tuple[PromptRecord, int]], say: Callable[[str], Any] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The samples of `todo` from the policy loaded in this process; `say` prints where it runs."""
    if not todo:  # nothing missing: do not even load the model
        return
    precision = choose_precision(config.dtype, resolve_device(config.device))
    if say is not None:
        say(f"sampling {config.policy_name}: {precision.line()}")
    tokenizer, model = load_causal_lm(
        config.policy_name, precision.device, precision.dtype, config.revision,
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
            by_prompt.setdefault(row["prompt_id"], {})[row["sample_index"]] = response_from_json(
                row["response"]
            )
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
            {"id": f"{p.id}-{i}-{j}", "prompt": prompt_json(p.prompt), "response_a": response_json(p.prompt, texts[i]),
             "response_b": response_json(p.prompt, texts[j])}
            for i, j in combos
        ]  # fmt: skip
    return pairs
