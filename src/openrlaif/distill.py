"""Distillation (`openrlaif distill`): a teacher model writes demonstrations (prompt + completion) for SFT.

Sharma et al. (arXiv 2402.12366) compare SFT on a strong teacher's completions with SFT on a weak
teacher's completions followed by AI feedback. The teacher is any model that can generate: a
model folder or Hugging Face id (sampled in process), or a judge config whose model generates
(an `hf` judge's `model`, or an `openai` judge's server and model). Greedy by default: the
teacher's best answer. The work is `openrlaif generate` with one response per prompt (so it is
seeded, batched and resumable the same way); the result is rewritten as SFT rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openrlaif.config import (
    EmbeddingJudgeConfig,
    EnsembleJudgeConfig,
    HFJudgeConfig,
    OpenAIJudgeConfig,
    load_judge_config,
)
from openrlaif.data.io import read_jsonl_dicts, write_records
from openrlaif.data.records import prompt_from_json, response_from_json, response_json
from openrlaif.data.refs import materialize, prompt_rows
from openrlaif.errors import ConfigError
from openrlaif.generation import GenerateConfig, generate
from openrlaif.inference.server import ServerConfig


def teacher_source(model: str | None, judge: str | None) -> dict[str, Any]:
    """GenerateConfig settings for a teacher: `policy` (in process) or `server`."""
    if (model is None) == (judge is None):
        raise ConfigError("teacher: give exactly one of a model (path or id) or a judge config")
    if model is not None:
        return {"policy": model}
    config = load_judge_config(judge)  # type: ignore[arg-type]
    if isinstance(config, HFJudgeConfig):
        return {
            "policy": config.model,
            "chat_template": config.chat_template,
            "trust_remote_code": config.trust_remote_code,
        }
    if isinstance(config, OpenAIJudgeConfig):
        server = ServerConfig(
            model=config.model, base_urls=config.base_urls, endpoint=config.endpoint, api_key_env=config.api_key_env,
            concurrency=config.concurrency, max_retries=config.max_retries,
        )  # fmt: skip
        return {"server": server.model_dump()}
    kind = "an embedding judge" if isinstance(config, EmbeddingJudgeConfig) else "an ensemble"
    assert isinstance(config, EmbeddingJudgeConfig | EnsembleJudgeConfig)
    raise ConfigError(
        f"teacher judge {judge!r} is {kind}, which cannot write text; use an hf or openai judge"
    )


def distill(
    source: dict[str, Any], prompts: str, out: str | Path, temperature: float = 0.0, max_new_tokens: int = 128,
    limit: int | None = None, seed: int = 0, batch_size: int = 16, show_progress: bool = True,
) -> Path:  # fmt: skip
    """Write `out` (.jsonl): one {id, prompt, completion, teacher} row per prompt with a non-empty
    response. The raw samples go to `<out>.samples.jsonl`, which a re-run resumes from."""
    out = Path(out)
    samples = out.with_name(out.name.removesuffix(".jsonl") + ".samples.jsonl")
    if ":" in prompts and not Path(prompts).exists():  # a part of a built-in dataset: write it out
        prompt_file = out.with_name(out.name.removesuffix(".jsonl") + ".prompts.jsonl")
        prompts = str(materialize(prompt_rows(prompts, None, "prompts"), prompt_file, "prompts"))
    config = GenerateConfig(
        **source, prompts=prompts, limit=limit, num_responses=1, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, out=str(samples),
    )  # fmt: skip
    generate(config, show_progress=show_progress)
    rows = []
    for r in read_jsonl_dicts(samples):
        prompt, text = prompt_from_json(r["prompt"]), response_from_json(r["response"]).strip()
        if text:  # an empty completion teaches nothing (and SFT rejects it)
            completion = response_json(prompt, text)  # in the prompts' format, text or conversational
            rows.append({"id": r["prompt_id"], "prompt": r["prompt"], "completion": completion, "teacher": r["policy"]})  # fmt: skip
    if not rows:
        raise ConfigError(
            f"{samples}: the teacher wrote only empty responses; check the teacher and max_new_tokens"
        )
    write_records(out, rows)
    return out
