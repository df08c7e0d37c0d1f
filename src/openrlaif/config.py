"""Typed configs: YAML in, validated by pydantic, one-line errors out. No strings are evaluated.

The shared pieces every config uses: `StrictModel` (unknown keys are errors: a typo should never
be silently ignored), `format_validation_error` (a pydantic error as one line naming the file and
the setting), and the `--set a.b=VALUE` overrides of the command line (`parse_set_overrides`,
`apply_overrides`).

A judge config picks one of four backends with `backend:`. Fields that change a judge's answers
go into its cache key; fields that only change speed (batch size, concurrency, URLs, timeouts) do
not.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openrlaif.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

PACKAGED_JUDGE_DIR = Path(__file__).parent / "configs" / "judges"

# Fields that never change a judgment, left out of the cache key.
SPEED_ONLY_FIELDS = {
    "name", "batch_size", "device", "concurrency", "base_urls", "api_key_env", "timeout_s",
    "max_retries", "backoff_base_s", "backoff_max_s", "reuse_prefix_cache", "weight",
}  # fmt: skip


class StrictModel(BaseModel):
    """The base of every config: an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------- one-line errors

# pydantic's error types for a discriminated union whose tag is missing or unknown
_UNION_TAG_ERRORS = ("union_tag_invalid", "union_tag_not_found")


def format_validation_error(source: str, err: ValidationError, drop: Collection[str] = ()) -> str:
    """The first error as one line, `source: dotted.setting: message (and N more)`.

    Leading location parts in `drop` are left out (a wrapper key, a union's tag such as a judge's
    backend: names the user never wrote). A missing or unknown union tag is reported at the tag's
    own setting (`backend: Input tag 'x' ...`); an error across settings has no setting name.
    """
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    while parts and parts[0] in drop:
        parts = parts[1:]
    if first["type"] in _UNION_TAG_ERRORS:
        parts.append(str(first.get("ctx", {}).get("discriminator", "")).strip("'"))
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    where = ".".join(p for p in parts if p)
    return f"{source}: {where + ': ' if where else ''}{message}{more}"


# ---------------------------------------------------------------- experiment trackers

# `report_to:` of the trainers and the pipeline. TensorBoard comes with openrlaif; the others are
# the `trackers` extra. The names are here, below training and the pipeline, so that both check
# them (and the pipeline before its first stage) without importing torch.
Tracker = Literal["tensorboard", "wandb", "trackio"]
TRACKER_EXTRAS: dict[str, str] = {"wandb": "trackers", "trackio": "trackers"}


def check_trackers(names: Collection[str]) -> None:
    """A one-line ConfigError naming the extra to install when a tracker asked for is missing."""
    missing = [n for n in dict.fromkeys(names) if n in TRACKER_EXTRAS and importlib.util.find_spec(n) is None]
    if missing:
        extras = sorted({TRACKER_EXTRAS[n] for n in missing})
        raise ConfigError(
            f"report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'openrlaif[{','.join(extras)}]' (or pip install {' '.join(missing)})"
        )


# ---------------------------------------------------------------- --set overrides


def parse_set_overrides(items: Sequence[str], example: str = "max_steps=100") -> dict[str, Any]:
    """`--set a.b=VALUE` items as {dotted key: value}, VALUE read as YAML; a later item wins.

    `example` is shown in the one-line error for a malformed item. Apply the result to a config's
    settings with `apply_overrides`.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {example}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        overrides.pop(key, None)  # re-inserted last: later items are applied later
        overrides[key] = value
    return overrides


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Put each dotted key's value into the nested settings `data` (in place), creating missing
    levels: `policies.rlaif.settings.beta` = 0.1 sets data["policies"]["rlaif"]["settings"]["beta"]."""
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {key!r} is not a mapping of settings")
            node = child
        node[last] = value


# ---------------------------------------------------------------- judge configs


class DecodingConfig(StrictModel):
    """Chain of thought and self-consistency, shared by the HF and HTTP judges."""

    cot: bool = False  # two steps: greedy rationale, then score the label tokens
    self_consistency: int = Field(1, ge=1)  # >1: that many rationales at `temperature`, averaged
    temperature: float = Field(1.0, gt=0.0)  # only used when self_consistency > 1
    max_rationale_tokens: int = Field(256, ge=1)
    seed: int = 0
    # A constitution (pairwise judgments): a list of principles, a YAML file of them, or a shipped
    # one (`harmless`); each judgment shows `principles_per_judgment` of them, drawn per pair
    principles: list[str] | str | None = None
    principles_per_judgment: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistency_needs_cot(self) -> DecodingConfig:
        if self.self_consistency > 1 and not self.cot:
            raise ValueError("self_consistency > 1 needs cot: true (it samples several rationales)")
        return self


class HFJudgeConfig(DecodingConfig):
    """A local causal LM scored by the log-probabilities of the label tokens."""

    backend: Literal["hf"] = "hf"
    name: str | None = None
    model: str  # any Hugging Face model id or local path
    revision: str | None = None
    template: str = "harmless"  # built-in template set name or a YAML file
    chat_template: Literal["auto", "on", "off"] = "auto"  # "auto": use it when the tokenizer has one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    batch_size: int = Field(16, ge=1)
    max_length: int | None = None  # prompts longer than this are cut from the left of the context
    reuse_prefix_cache: bool = True  # encode the shared preamble/few-shot prefix once (KV cache)
    trust_remote_code: bool = False


class OpenAIJudgeConfig(DecodingConfig):
    """An OpenAI-compatible server (vLLM, SGLang, llama.cpp server, OpenAI) scored via logprobs."""

    backend: Literal["openai"] = "openai"
    name: str | None = None
    model: str
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"], min_length=1)
    endpoint: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = "OPENAI_API_KEY"  # the *name* of the variable; the key is never stored
    template: str = "harmless"
    # OpenAI allows up to 20 (5 on the legacy completions endpoint); vLLM up to --max-logprobs
    # (default 20); a value the server refuses comes back as a one-line HTTP 400 error.
    top_logprobs: int = Field(20, ge=1)
    # A label missing from the top_logprobs is read with a logit_bias on its tokens (+100: the
    # server then answers with it and returns its log-prob; judges/openai_compat.py). The tokens'
    # ids come from `tokenizer` (the served model's: an HF id or folder, `packaged:`, `gguf:`), else
    # from the server's tokenize endpoint (vLLM, llama.cpp). "off": never biased (as below).
    label_bias: Literal["auto", "off"] = "auto"
    tokenizer: str | None = None
    # Where logit_bias cannot read a missing label (ids unknown, the server ignores the bias), ask
    # once more for this many top tokens (more than top_logprobs); a judgment with neither label
    # is then undecided: counted, listed beside a labeling job's output, never a 0.5.
    fallback_top_logprobs: int | None = Field(None, ge=2)
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _fallback_is_wider(self) -> OpenAIJudgeConfig:
        if self.fallback_top_logprobs is not None and self.fallback_top_logprobs <= self.top_logprobs:
            raise ValueError(
                f"fallback_top_logprobs ({self.fallback_top_logprobs}) must be more than top_logprobs "
                f"({self.top_logprobs})"
            )
        return self


class EmbeddingJudgeConfig(StrictModel):
    """A sentence-embedding rubric judge: cheap, offline, weak. See judges/embedding.py."""

    backend: Literal["embedding"] = "embedding"
    name: str | None = None
    model: str = "packaged:all-MiniLM-L6-v2"  # or any sentence-transformers model id/path
    rubric: str
    anti_rubric: str | None = None
    prompt_weight: float = 0.0  # >0: penalise responses that echo the request
    temperature: float = Field(0.05, gt=0.0)  # of the logistic on the score difference
    # bf16 autocast or none; auto: bf16 where the hardware runs it natively (models/precision.py)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"


class EnsembleJudgeConfig(StrictModel):
    """Averages the soft labels (and scores) of several judges."""

    backend: Literal["ensemble"] = "ensemble"
    name: str | None = None
    judges: list[
        Annotated[HFJudgeConfig | OpenAIJudgeConfig | EmbeddingJudgeConfig, Field(discriminator="backend")]
        | str
    ] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> EnsembleJudgeConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.judges):
                raise ValueError(f"weights has {len(self.weights)} entries but judges has {len(self.judges)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be non-negative and not all zero")
        return self


JudgeConfig = Annotated[
    HFJudgeConfig | OpenAIJudgeConfig | EmbeddingJudgeConfig | EnsembleJudgeConfig,
    Field(discriminator="backend"),
]


class _JudgeFile(StrictModel):
    judge: JudgeConfig


BACKENDS = ("hf", "openai", "embedding", "ensemble")


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Read a YAML file into a pydantic model with a one-line error naming the file and setting."""
    path = Path(path)
    data = read_yaml(path)
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None


def judge_config_from_dict(data: Any, source: str = "<judge config>") -> JudgeConfig:
    try:
        return _JudgeFile.model_validate({"judge": data}).judge
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e, drop=("judge", *BACKENDS))) from None


def builtin_judge_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_JUDGE_DIR.glob("*.yaml"))


def resolve_shipped_yaml(name_or_path: str, shipped_dir: Path, kind: str) -> Path:
    """A YAML file, or one shipped in `shipped_dir` by name (`sft-tiny` = shipped_dir/sft-tiny.yaml);
    otherwise a one-line error that lists the shipped names."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = shipped_dir / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such file, and not a shipped {kind} ({names})")


def resolve_judge_path(name_or_path: str) -> Path:
    return resolve_shipped_yaml(name_or_path, PACKAGED_JUDGE_DIR, "judge")


def load_judge_config(name_or_path: str) -> JudgeConfig:
    """A shipped judge by name (see `openrlaif judges`) or a YAML file with the judge's settings."""
    path = resolve_judge_path(name_or_path)
    config = judge_config_from_dict(read_yaml(path), str(path))
    if config.name is None:  # how jobs name it in their output ("judge embedding-harmless: ...")
        config.name = path.stem
    if isinstance(config, EnsembleJudgeConfig):  # members may be given as names/paths
        members = []
        for member in config.judges:
            members.append(load_judge_config(_relative(member, path)) if isinstance(member, str) else member)
        config.judges = members  # type: ignore[assignment]  # a member file may be an ensemble: build_judge nests it
    return config


def _relative(member: str, parent: Path) -> str:
    candidate = parent.parent / member
    return str(candidate) if candidate.exists() else member


def answer_fields(config: BaseModel) -> dict[str, Any]:
    """The settings that change a judge's answers (its cache-key part)."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in SPEED_ONLY_FIELDS}
