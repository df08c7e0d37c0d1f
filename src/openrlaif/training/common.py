"""Shared training infrastructure: what every trainer (SFT, reward model, DPO, RL) needs the same way.

Each trainer keeps its own loop, readable top to bottom in its own module; this module holds the
parts that must behave identically everywhere:

- `TrainConfig`: the typed settings every trainer shares (pydantic, unknown keys are errors).
- loading: tokenizer (pad = eos when missing) and models from any Hugging Face path, with
  `trust_remote_code` off unless asked for; `tiny:gpt2` / `tiny:llama` build the offline test models.
- `make_accelerator`: one `accelerate.Accelerator` (CPU, one or many processes with gloo, or GPUs).
- `ShardedBatches`: seeded, resumable batches, sharded across processes like `DistributedSampler`.
- checkpoints: model, optimizer and scheduler state, RNG states and the data position, as
  safetensors + JSON (nothing pickled), written to a temp dir and renamed into place; a full disk
  is one line naming the checkpoint, and the previous one stays the newest.
- `one_writer_per_output_dir`: a second run on an `output_dir` in use is refused at once.
- `MetricsLogger`: rich progress bar, `metrics.jsonl` and TensorBoard.
- `check_finite`: a non-finite loss stops the run with one line naming the step.
- `sequence_logprobs`: summed log-probs of the label tokens of each sequence (SFT loss, DPO, RL).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from openrlaif.config import format_validation_error as _format_validation_error
from openrlaif.config import load_yaml_model, read_yaml, resolve_shipped_yaml
from openrlaif.data.io import disk_full_error, write_text_atomic
from openrlaif.data.lock import one_writer
from openrlaif.errors import ConfigError, DiskFullError, OpenRLAIFError
from openrlaif.models.names import resolve_model_path

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in Hugging Face models
CHECKPOINTS = "checkpoints"
KILL_ENV = "OPENRLAIF_KILL_AT_STEP"  # testing aid, see `simulate_kill`


class TrainingError(OpenRLAIFError):
    """A run that cannot go on: a non-finite loss, too little data for the batch size, ..."""


# ---------------------------------------------------------------- config


class TrainConfig(BaseModel):
    """Settings every trainer shares. Trainers subclass it (SFTConfig, RewardConfig, ...)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # model and data
    model: str  # HF model id or local folder; `tiny:gpt2` / `tiny:llama` = offline random test models
    revision: str | None = None
    trust_remote_code: bool = False  # never run a model repo's code unless asked for
    data: str  # a file (.jsonl/.jsonl.gz/.parquet) or a built-in dataset name
    eval_data: str | None = None  # held-out file; without it, `eval_fraction` of `data` is held out
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_eval_examples: int | None = Field(512, ge=1)  # cap on the held-out set (eval cost)
    limit: int | None = Field(None, ge=1)  # use only the first N examples of `data`
    max_length: int = Field(512, ge=8)  # tokens; prompts are cut from the left, completions from the right
    # Batches are padded to the longest sequence rounded up to a multiple of this. 1: no rounding.
    # On CPU, every new batch shape leaves the allocator and oneDNN's kernel cache holding more
    # memory; 64 keeps the shapes few (the quickstart's RM stage: 2.2 instead of 4.0 GiB peak RSS)
    # for ~10% more compute. On GPUs, 8 or 64 also suits the tensor cores.
    pad_to_multiple_of: int = Field(1, ge=1)
    output_dir: str

    # optimisation
    seed: int = 0
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides `epochs` when set
    batch_size: int = Field(8, ge=1)  # examples per process per micro-step
    grad_accum_steps: int = Field(1, ge=1)  # micro-steps per optimizer step
    eval_batch_size: int | None = Field(None, ge=1)  # default: batch_size
    learning_rate: float = Field(1e-5, gt=0.0)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup, decay to 0 (or stay)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)  # fraction of the steps with a linear warmup
    weight_decay: float = Field(0.0, ge=0.0)  # AdamW; applied to matrices only, not biases/norms
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)  # None: no clipping (the norm is still logged)
    # bf16 autocast with fp32 weights and optimizer state. "auto": bf16 where the hardware runs it
    # natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, where it measured 1.5-2x faster)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    cpu: bool = False  # train on CPU even when a GPU is present (always CPU when none is)

    # bookkeeping
    log_every: int = Field(1, ge=1)  # steps between metric rows (JSONL, TensorBoard)
    eval_every: int = Field(100, ge=0)  # steps between held-out evaluations; 0 = only before and after
    save_every: int = Field(100, ge=1)  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = Field(2, ge=1)  # older checkpoints are deleted
    tensorboard: bool = True
    record_example_ids: bool = False  # write the ids each process trained on, per step

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


C = TypeVar("C", bound=TrainConfig)

PACKAGED_TRAIN_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


def resolve_train_config_path(name_or_path: str) -> Path:
    """A config file, or a shipped one by name (`sft-tiny` = configs/train/sft-tiny.yaml)."""
    return resolve_shipped_yaml(name_or_path, PACKAGED_TRAIN_DIR, "training config")


def load_train_config(path: str | Path, model: type[C], overrides: Sequence[str] = ()) -> C:
    """A YAML config, optionally with `KEY=VALUE` overrides (VALUE is read as YAML), validated with
    a one-line error naming the file and the setting."""
    if not overrides:
        return load_yaml_model(path, model)
    data = read_yaml(Path(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=100")
        try:
            data[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(f"{path} (with --set)", e)) from None


# ---------------------------------------------------------------- models and tokenizers


def quiet_transformers() -> None:
    """Training prints its own progress; loading reports and weight-loading bars would drown it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_error(path: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"model: cannot load {path!r} ({first})")


def load_tokenizer(
    path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded; pad = eos when the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model: the tokenizer of {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_pretrained(
    auto_class: Any, path: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """`auto_class.from_pretrained` in float32 (mixed precision autocasts; the weights stay fp32)."""
    try:
        return auto_class.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None


# ---------------------------------------------------------------- accelerate, seeding


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One Accelerator: a single process, `accelerate launch` processes (gloo on CPU), or GPUs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several times (a pipeline, tests, a notebook); accelerate keeps its
        # state process-wide and refuses a second mixed-precision setting, so start from scratch.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    accelerator = Accelerator(
        cpu=config.cpu or not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(config),
        gradient_accumulation_steps=config.grad_accum_steps,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # DeepSpeed wants the micro-batch size; we do not hand it a DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return accelerator


def resolve_mixed_precision(config: TrainConfig) -> str:
    """`auto` -> "bf16" where the hardware has native bf16 math, else "no"."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available() and not config.cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return "bf16" if any(native) else "no"


def uses_sharded_engine(accelerator: Accelerator) -> bool:
    """DeepSpeed and FSDP shard weights/optimizer state; their checkpoints go through accelerate."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as JSON: dropout and sampling resume exactly."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[v.item() if hasattr(v, "item") else v for v in np_state[2:]],
        ],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in state["cuda"]])


# ---------------------------------------------------------------- data


class ShardedBatches:
    """Seeded, resumable micro-batches of example indices, sharded across processes.

    Every epoch is a permutation drawn from (seed, epoch). Global micro-batch j is the slice
    [j·B·W, (j+1)·B·W) of it, and process r takes the r-th block of B: with one process this is
    plain shuffled batching, with W processes each sees different examples (like
    DistributedSampler). The incomplete last global batch is dropped so every process runs the
    same number of steps (DDP needs that). The position (epoch, batch) goes into checkpoints.

    With `lengths` (tokens per example) the batches are grouped by length, as transformers'
    `LengthGroupedSampler`: the epoch's permutation is cut into chunks of up to 50 global batches
    (at most a quarter of the epoch), each chunk is sorted by length and cut into global batches,
    and the order of all the epoch's batches is shuffled. The examples of an epoch are the same
    as without grouping; a batch holds examples of similar length, so it needs less padding.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.lengths = None if lengths is None else list(lengths)
        self.batches_per_epoch = n // (batch_size * world_size)
        self.epoch, self.batch = 0, 0
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
            self._order = order if self.lengths is None else self._grouped(order, generator)
        return self._order

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        lengths = self.lengths
        assert lengths is not None
        size = self.batch_size * self.world_size  # one global batch
        used = order[: self.batches_per_epoch * size]  # the examples an ungrouped epoch uses
        chunk = size * max(1, min(50, self.batches_per_epoch // 4))
        batches = []
        for start in range(0, len(used), chunk):
            # longest first; the sort is stable, so examples of equal length stay in random order
            by_length = sorted(used[start : start + chunk], key=lambda i: -lengths[i])
            batches += [by_length[k : k + size] for k in range(0, len(by_length), size)]
        return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]

    def next_batch(self) -> list[int]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        self.batch += 1
        return self._permutation()[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def eval_shard(n: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """This process's share of n held-out examples as (index, counts). Every process gets the same
    number of items (a sharded model's forward is collective), padded with repeats that do not count."""
    per_process = math.ceil(n / world_size)
    return [(i % n, i < n) for i in range(rank, per_process * world_size, world_size)]


def split_held_out(
    items: Sequence[Any], config: TrainConfig, eval_items: Sequence[Any] | None = None
) -> tuple[list[Any], list[Any]]:
    """(train, held-out): `eval_items` when given, else a seeded `eval_fraction` of `items`.

    Items that share a prompt (several pairs of one prompt's samples) are held out together:
    a pair whose responses also occur in training pairs would not measure generalisation. With
    distinct prompts this is a plain seeded sample of items."""
    items = list(items)
    if eval_items is not None:
        held_out = list(eval_items)
    elif config.eval_fraction > 0 and len(items) > 1:
        order = list(range(len(items)))
        random.Random(config.seed).shuffle(order)
        n_eval = max(1, round(config.eval_fraction * len(items)))
        if config.max_eval_examples is not None:
            n_eval = min(n_eval, config.max_eval_examples)
        by_prompt: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            by_prompt.setdefault(getattr(item, "prompt", i), []).append(i)
        held: set[int] = set()
        for i in order:
            if len(held) >= n_eval:
                break
            held.update(by_prompt[getattr(items[i], "prompt", i)])
        if len(held) == len(items):  # one prompt only: keep something to train on
            held = set(order[:n_eval])
        held_out = [items[i] for i in sorted(held)]
        items = [x for i, x in enumerate(items) if i not in held]
    else:
        held_out = []
    if config.max_eval_examples is not None:
        held_out = held_out[: config.max_eval_examples]
    return items, held_out


ChatTemplate = Literal["auto", "on", "off"]  # "auto": the chat template when the tokenizer has one


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, setting: ChatTemplate, model: str) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template, as `generate` and RL
    decide it (`generation.use_chat_template`); "on" without a template is an error."""
    has_one = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has_one:
        raise ConfigError(
            f"chat_template: 'on' but the tokenizer of {model!r} has no chat template; set chat_template: auto or off"
        )
    return has_one and setting != "off"


def completion_text(prompt: str, completion: str, chat: bool = False) -> str:
    """The completion as it follows the prompt. Plain text: a space is put between them unless one
    is there (HH-RLHF replies follow `Assistant:`; TRL-style completions usually bring their own).
    Chat: the completion starts the assistant turn right after the generation prompt, without
    leading whitespace, as templates render a message's content and as `generate` stores replies."""
    if chat:
        return completion.lstrip()
    if not completion or prompt[-1:].isspace() or completion[:1].isspace():
        return completion
    return " " + completion


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Prompt token ids exactly as `generate` and RL encode them (`generation.encode_prompt`): the
    text with the tokenizer's special tokens (e.g. BOS), or the chat template's rendering of the
    prompt as user turn(s) plus the generation prompt."""
    if not chat:  # one batched call; the same ids as encode_prompt(tokenizer, prompt, False)
        return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    from openrlaif.generation import encode_prompt

    encoded: dict[str, list[int]] = {}  # DPO and RM pass every prompt twice
    for prompt in prompts:
        if prompt not in encoded:
            encoded[prompt] = encode_prompt(tokenizer, prompt, True)
    return [list(encoded[prompt]) for prompt in prompts]


def encode_prompt_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    append_eos: bool,
    chat: bool = False,
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion and the number of prompt tokens, for each pair.

    Prompt and completion are tokenized separately, the prompt as the policy sees it when it
    generates (`encode_prompts`; with `chat`, rendered by the chat template). Too long: the
    completion keeps at least half of `max_length` and is cut at its end; the prompt is cut from
    the left (after its BOS), so the text nearest the completion stays.
    """
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    texts = [completion_text(p, c, chat) for p, c in zip(prompts, completions, strict=True)]
    completion_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # the token a tokenizer puts first (GPT/Llama BOS, BERT [CLS], which a classifier reads) stays
    starts = {tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)} - {None}
    out = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        c = c + [tokenizer.eos_token_id] if append_eos else c
        if len(p) + len(c) > max_length:
            c = c[: max(max_length - len(p), max_length // 2)]
            room = max_length - len(c)
            head = p[:1] if p[:1] and p[0] in starts else []
            p = head + p[len(p) - (room - len(head)) :] if len(p) > room else p
        out.append((p + c, len(p)))
    return out


def encoded_lengths(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    append_eos: bool,
    chat: bool = False,
    chunk: int = 1024,
) -> list[int]:
    """Tokens of each prompt + completion as `encode_prompt_completions` encodes them (for
    length-grouped batches), tokenized in chunks so a large dataset is never held as ids."""
    out: list[int] = []
    for start in range(0, len(prompts), chunk):
        encoded = encode_prompt_completions(
            tokenizer, prompts[start : start + chunk], completions[start : start + chunk], max_length, append_eos, chat
        )  # fmt: skip
        out += [len(ids) for ids, _ in encoded]
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad_value: int, multiple: int = 1) -> torch.Tensor:
    """Right-padded to the longest sequence, rounded up to a multiple of `multiple`."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([list(s) + [pad_value] * (width - len(s)) for s in seqs], dtype=torch.long)


# ---------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused where the device has the kernel); weight decay on matrices (dim >= 2) only, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for the whole update (CPU and CUDA), as transformers' default `adamw_torch_fused`
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=fused,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear/cosine decay to 0, or constant.
    Stepped once per optimizer step (not passed through accelerate, which would step it once per process)."""
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(config: TrainConfig, loader: ShardedBatches, n_train: int, world_size: int) -> int:
    """Total optimizer steps: `max_steps`, or `epochs` passes over the training examples."""
    if loader.batches_per_epoch == 0:
        raise TrainingError(
            f"batch_size {config.batch_size} x {world_size} process(es) needs at least "
            f"{config.batch_size * world_size} training examples; the data has {n_train} after the held-out split"
        )
    if config.max_steps is not None:
        return config.max_steps
    steps_per_epoch = max(1, loader.batches_per_epoch // config.grad_accum_steps)
    return max(1, math.ceil(config.epochs * steps_per_epoch))


def check_finite(
    step: int, name: str, value: float | torch.Tensor | None, last_checkpoint: Path | None
) -> None:
    """Stop on a non-finite quantity with one line naming the step; the last good checkpoint stays."""
    if value is None:
        return
    v = float(value)
    if math.isfinite(v):
        return
    if last_checkpoint is not None:
        hint = f"the last good checkpoint is {last_checkpoint}; lower learning_rate and resume with --resume"
    else:
        hint = "no checkpoint was written before it; lower learning_rate and start again"
    raise TrainingError(f"step {step}: {name} is {v} ({hint})")


def simulate_kill(step: int) -> None:
    """Testing aid: with `OPENRLAIF_KILL_AT_STEP=k` the process SIGKILLs itself right after the
    optimizer step k, before step k's checkpoint: a crash or a preempted job, no clean-up at all."""
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each position (logits (B, T, V) aligned with labels (B, T)); 0 where the
    label is IGNORE_INDEX. In float32: logsumexp in bf16 loses too much for a loss."""
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logits = logits.float()
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def sequence_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the labeled tokens of each sequence, and their count: (B,), (B,).

    `labels` is `input_ids` with IGNORE_INDEX where no log-prob is wanted (prompt, padding).
    Position t predicts token t+1, so logits and labels are shifted by one.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    logp = token_logprobs(logits[:, :-1], targets)
    return logp.sum(-1), (targets != IGNORE_INDEX).sum(-1)


# ---------------------------------------------------------------- checkpoints

# Nested optimizer/scheduler state as JSON with every tensor moved to a safetensors file. Dicts are
# stored as key/value lists so integer keys (the optimizer's parameter indices) stay integers.


def _to_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _to_tree(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_to_tree(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} (at {path}) in a checkpoint")


def _from_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_from_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_from_tree(v, tensors) for v in obj["__tuple__"])
        return {k: _from_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state_files(state: dict[str, Any], directory: Path, name: str) -> None:
    """`name.json` (+ `name.safetensors` when the state holds tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _to_tree(state, name, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(tree), encoding="utf-8")


def load_state_files(directory: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _from_tree(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint (temp dirs of a save that was cut short are ignored)."""
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("step-*"):
        state_file = path / "trainer_state.json"
        if path.is_dir() and state_file.exists():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            found.append(Checkpoint(path, int(state["step"]), state))
    return max(found, key=lambda c: c.step) if found else None


def save_model_folder(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """An HF model folder (config + safetensors + tokenizer). Collective: every process calls it
    (a sharded engine gathers the weights); the main process writes."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with disk_full_error(directory):
            unwrapped.save_pretrained(directory, state_dict=state_dict)
            tokenizer.save_pretrained(directory)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ShardedBatches,
    keep: int,
    extra: dict[str, Any] | None = None,
    extra_models: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write checkpoint `step-N` atomically: everything goes into a temp dir that is renamed into
    place last, so a run killed mid-save, or one that fills the disk, leaves the previous checkpoint
    as the newest one.
    `extra_models` (e.g. RL's value model) are saved as model folders `step-N/<name>`."""
    root = output_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    try:
        with disk_full_error(final):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            if uses_sharded_engine(accelerator):  # DeepSpeed/FSDP: accelerate's own format (not tested here)
                accelerator.save_state(str(tmp / "accelerate"))
            save_model_folder(accelerator, model, tokenizer, tmp / "model")
            for name, extra_model in (extra_models or {}).items():
                save_model_folder(accelerator, extra_model, tokenizer, tmp / name)
            if accelerator.is_main_process and not uses_sharded_engine(accelerator):
                save_state_files(optimizer.state_dict(), tmp, "optimizer")
                save_state_files(scheduler.state_dict(), tmp, "scheduler")
            # every process has its own RNG streams (and so its own dropout masks)
            (tmp / f"rng.rank{accelerator.process_index}.json").write_text(
                json.dumps(rng_state()), encoding="utf-8"
            )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {
                    "step": step,
                    "data": loader.state_dict(),
                    "world_size": accelerator.num_processes,
                    **(extra or {}),
                }
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    except DiskFullError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the space back; the previous checkpoint stays the newest
        raise DiskFullError(str(final)) from None
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a finished run resumed): swap, then delete
            old = root / f".step-{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".step-*.tmp"):  # from saves that were killed
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    checkpoint: Checkpoint,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ShardedBatches,
) -> int:
    """Restore optimizer, scheduler, data position and RNG states (the weights were loaded from
    `checkpoint.model_dir` when the model was built). Returns the step to continue after."""
    world = int(checkpoint.state.get("world_size", 1))
    if world != accelerator.num_processes:
        raise TrainingError(
            f"{checkpoint.path} was written by {world} process(es); resume it with {world} "
            f"(got {accelerator.num_processes}), or start a new output_dir"
        )
    if uses_sharded_engine(accelerator):
        accelerator.load_state(str(checkpoint.path / "accelerate"))
    else:
        optimizer.load_state_dict(load_state_files(checkpoint.path, "optimizer"))
    scheduler.load_state_dict(load_state_files(checkpoint.path, "scheduler"))
    loader.load_state_dict(checkpoint.state["data"])
    rng_file = checkpoint.path / f"rng.rank{accelerator.process_index}.json"
    set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return checkpoint.step


# ---------------------------------------------------------------- run directory and metrics


def _truncate_jsonl(path: Path, keep_up_to_step: int) -> None:
    """Drop rows logged after `keep_up_to_step` (steps redone after a resume would repeat them)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed run
            continue
        if row.get("step", 0) <= keep_up_to_step:
            rows.append(line)
    write_text_atomic(path, "".join(r + "\n" for r in rows))


def prepare_run(
    config: TrainConfig, resume: bool, accelerator: Accelerator
) -> tuple[Path, Checkpoint | None]:
    """Create the output dir, find the checkpoint to resume from, save the resolved config."""
    out = Path(config.output_dir)
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"output_dir {out} already has a checkpoint (step {checkpoint.step}); "
            "pass --resume to continue that run, or choose another output_dir"
        )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config_file = out / "config.yaml"
        current = config.model_dump(mode="json")
        if checkpoint is not None and config_file.exists():
            before = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            if changed:
                print(f"note: resuming with changed settings: {', '.join(changed)}")
        write_text_atomic(config_file, yaml.safe_dump(current, sort_keys=False))
        keep = checkpoint.step if checkpoint else -1
        _truncate_jsonl(out / "metrics.jsonl", keep)
        for ids_file in out.glob("example_ids.rank*.jsonl"):
            _truncate_jsonl(ids_file, keep)
    accelerator.wait_for_everyone()
    return out, checkpoint


def append_line(path: Path, row: dict[str, Any]) -> None:
    """One JSON line appended to a log (metrics, example ids); a full disk is one line naming it.
    A torn last line from a killed run is skipped by readers and cut by `_truncate_jsonl`."""
    with disk_full_error(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def one_writer_per_output_dir(train: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Decorates a trainer: its `output_dir` takes one writer, and a second run on it is refused at
    once (data/lock.py). Under a launcher the main process (RANK 0) holds the lock for the launch;
    if it is refused it exits, and the launcher stops the other processes."""

    @functools.wraps(train)
    def run(config: TrainConfig, *args: Any, **kwargs: Any) -> TrainResult:
        if int(os.environ.get("RANK", "0")) != 0:
            return train(config, *args, **kwargs)
        with one_writer(config.output_dir):
            return train(config, *args, **kwargs)

    return run


@dataclass
class RunStart:
    """What the supervised trainers (SFT, RM, DPO) have in hand before they load a model."""

    accelerator: Accelerator
    output_dir: Path
    checkpoint: Checkpoint | None  # the one to resume from
    train_set: list[Any]
    held_out: list[Any]
    source: str  # where to load the model from: the checkpoint's folder when resuming, else `model`


def start_run(
    config: TrainConfig, resume: bool, load_examples: Callable[[str, int | None], Sequence[Any]]
) -> RunStart:
    """The opening the supervised trainers share: quiet library logs, the accelerator, the run
    folder (and the checkpoint to resume from), the seed, the data and its held-out split."""
    quiet_transformers()
    accelerator = make_accelerator(config)
    output_dir, checkpoint = prepare_run(config, resume, accelerator)
    set_seed(config.seed)
    # The held-out split depends only on the seed, so a resumed run gets the same one.
    examples = load_examples(config.data, config.limit)
    eval_examples = load_examples(config.eval_data, None) if config.eval_data else None
    train_set, held_out = split_held_out(examples, config, eval_examples)
    # from the checkpoint when resuming (the folder holds the tokenizer, and any head, too)
    with accelerator.main_process_first():  # a `tiny:` model is built once
        source = str(checkpoint.model_dir) if checkpoint else resolve_model_path(config.model)
    return RunStart(accelerator, output_dir, checkpoint, train_set, held_out, source)


class ExampleIdLog:
    """`example_ids.rank{r}.jsonl`: which examples this process trained on at each step."""

    def __init__(self, output_dir: Path, rank: int, enabled: bool) -> None:
        self.path = output_dir / f"example_ids.rank{rank}.jsonl"
        self.enabled = enabled

    def write(self, step: int, ids: list[str]) -> None:
        if self.enabled:
            append_line(self.path, {"step": step, "ids": ids})


@dataclass
class Throughput:
    """Samples and tokens per second of one optimizer step, over all processes."""

    started: float = field(default_factory=time.perf_counter)

    def rates(self, samples: float, tokens: float) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.started = time.perf_counter()
        return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


class MetricsLogger:
    """Metrics to the console (rich progress bar), `metrics.jsonl` and TensorBoard; main process only."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        config: TrainConfig,
        total_steps: int,
        start_step: int,
        title: str,
        show_progress: bool,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.active = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if self.active and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of steps that are redone after a resume
            self.writer = SummaryWriter(
                str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else 0
            )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))  # fmt: skip
        self.progress = Progress(*columns, disable=not (self.active and show_progress))
        self.task = self.progress.add_task(title, total=total_steps, completed=start_step, info="")
        self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        append_line(self.path, {"step": step, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def advance(self, step: int, info: str) -> None:
        if self.active:
            self.progress.update(self.task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self.active:
            self.progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()
        if self.writer is not None:
            self.writer.close()


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path  # the final HF model folder
    steps: int
    metrics: dict[str, float]  # the final held-out metrics
    first_metrics: dict[str, float] | None  # held-out metrics before training (None when resumed)
    model: torch.nn.Module  # the trained model (unwrapped), for programmatic use


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order: equal digests = bitwise equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
