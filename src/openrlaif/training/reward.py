"""Reward model on soft AI labels, top to bottom (DESIGN §2.2).

Given a prompt x, a chosen response y_c, a rejected one y_r and the AI labeler's probability p
that y_c is better, the loss is the cross-entropy between p and softmax(r(x, y_c), r(x, y_r)):

    L = -[p · log σ(r_c - r_r) + (1 - p) · log σ(r_r - r_c)]

computed with `logsigmoid` (no overflow for large margins); p ∈ {0, 1} is the Bradley-Terry
loss. Chosen and rejected go through the model in one concatenated forward pass.

Data: the output of `openrlaif label` (`p_chosen` is the soft label; `human_label`, when there,
is kept to measure against), any `prompt`/`chosen`/`rejected` file (p = 1), pairs with a human
label (`response_a`/`response_b` + `human_label` or `preferred`), or the built-in `hh-harmless`.

Model (`model_type`): any `AutoModelForSequenceClassification` with one output
(`sequence_classification`, the reward read by the model at its last non-pad token), or a causal
LM's transformer body with a scalar value head (`causal_lm_value_head`, reward at the last
attended token). The result is an HF model folder (safetensors) that `RewardModel` loads to
score text; it re-tokenizes, so the policy may use another tokenizer.

Format (`chat_template`, default "auto"): with a tokenizer that has a chat template the prompt is
rendered as user turn(s) plus the generation prompt (as `generate` encodes it for a policy) and
the response follows as the assistant's reply; the resolved choice is saved in the folder's
`openrlaif_reward.json`, so `RewardModel` scores text in the format it was trained on.

    openrlaif train rm --config configs/train/rm-tiny.yaml [--resume]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from openrlaif.data.chat import (
    ChatTemplate,
    encode_prompt_completions,
    encoded_lengths,
    resolve_chat_template,
)
from openrlaif.data.examples import PreferenceExample, parse_preference_row
from openrlaif.data.records import Prompt
from openrlaif.errors import ConfigError
from openrlaif.models.heads import ValueHeadModel
from openrlaif.models.loading import (
    adapter_base,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    quiet_transformers,
)
from openrlaif.models.lora import LoRATask, attach_adapter_folder
from openrlaif.models.precision import choose_precision
from openrlaif.training.batching import ShardedBatches, eval_shard, pad_right
from openrlaif.training.config import TrainConfig
from openrlaif.training.losses import soft_label_loss
from openrlaif.training.metrics import Throughput
from openrlaif.training.run import (
    TrainResult,
    apply_lora,
    one_writer_per_output_dir,
    read_examples,
    start_run,
)
from openrlaif.training.step import finish_step, start_steps

ModelType = Literal["sequence_classification", "causal_lm_value_head"]
METADATA_FILE = "openrlaif_reward.json"  # how to load the folder: model type, max length


class RewardConfig(TrainConfig):
    """Reward-model settings (the shared ones are documented on TrainConfig)."""

    method: ClassVar[str] = "reward-model"

    model_type: ModelType = "sequence_classification"
    learning_rate: float = Field(1e-5, gt=0.0)
    # Batches of pairs of similar length (ShardedBatches): less padding, the same pairs per epoch.
    group_by_length: bool = True
    # Prompts rendered with the tokenizer's chat template (as `generate` and RL encode them for the
    # policy), the response as the assistant's reply; "auto": when the tokenizer has one. The
    # choice is saved with the model: `RewardModel` scores text the same way.
    chat_template: ChatTemplate = "auto"


# ---------------------------------------------------------------- data


def load_preference_examples(source: str, limit: int | None = None) -> list[PreferenceExample]:
    # a built-in dataset: people's choices, hard labels that are also human labels
    return read_examples(
        source, limit, lambda p: PreferenceExample(p.id, p.prompt, p.response_a, p.response_b, 1.0, 1.0),
        parse_preference_row,
    )  # fmt: skip


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T): the B chosen sequences, then the B rejected ones
    attention_mask: torch.Tensor
    p: torch.Tensor  # (B,)
    human: torch.Tensor  # (B,), NaN where unknown
    n_tokens: int

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.p.to(device),
            self.human.to(device),
            self.n_tokens,
        )


def pair_lengths(
    tokenizer: Any, examples: Sequence[PreferenceExample], max_length: int, append_eos: bool, chat: bool
) -> list[int]:
    """Tokens of the longer of each pair's two sequences (prompt + chosen, prompt + rejected): the
    width the pair needs in a batch, for length-grouped batches."""
    prompts = [x.prompt for x in examples]
    chosen = encoded_lengths(tokenizer, prompts, [x.chosen for x in examples], max_length, append_eos, chat)
    rejected = encoded_lengths(
        tokenizer, prompts, [x.rejected for x in examples], max_length, append_eos, chat
    )
    return [max(c, r) for c, r in zip(chosen, rejected, strict=True)]


def encode_texts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int,
    chat: bool = False,
    pad_multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of prompt + response (no EOS: the reward is read at the
    response's last token; with pad = eos an appended EOS would be taken for padding)."""
    encoded = encode_prompt_completions(
        tokenizer, prompts, responses, max_length, append_eos=False, chat=chat
    )
    input_ids = pad_right([ids for ids, _ in encoded], tokenizer.pad_token_id, pad_multiple)
    attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0, pad_multiple)
    return input_ids, attention_mask


def collate(
    examples: list[PreferenceExample],
    tokenizer: Any,
    max_length: int,
    chat: bool = False,
    pad_multiple: int = 1,
) -> PairBatch:
    prompts = [x.prompt for x in examples]
    input_ids, attention_mask = encode_texts(
        tokenizer,
        prompts + prompts,
        [x.chosen for x in examples] + [x.rejected for x in examples],
        max_length,
        chat,
        pad_multiple,
    )
    p = torch.tensor([x.p for x in examples], dtype=torch.float32)
    human = torch.tensor([math.nan if x.human is None else x.human for x in examples], dtype=torch.float32)
    return PairBatch(input_ids, attention_mask, p, human, int(attention_mask.sum()))


# ---------------------------------------------------------------- model


def load_reward_backbone(
    path: str,
    model_type: ModelType,
    tokenizer: Any,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A causal LM with a new one-output head, or a reward model saved before (its head kept)."""
    if model_type == "causal_lm_value_head":
        model = ValueHeadModel.from_pretrained(path, revision, trust_remote_code)
    else:
        from transformers import AutoModelForSequenceClassification  # why: transformers is slow to import

        try:
            architectures = load_model_config(path, revision, trust_remote_code).architectures
        except (OSError, ValueError):
            architectures = None  # load_pretrained below reports the problem in one line
        has_head = any(a.endswith("ForSequenceClassification") for a in architectures or [])
        extra = {} if has_head else {"num_labels": 1}  # a saved classifier keeps its own head
        model = load_pretrained(
            AutoModelForSequenceClassification, path, revision, trust_remote_code, **extra
        )
        if model.config.num_labels != 1:
            raise ConfigError(
                f"model: {path!r} has {model.config.num_labels} outputs; a reward model needs 1"
            )
    # sequence-classification models find the last real token by the pad id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _lora_task(model_type: ModelType) -> LoRATask:
    return "value_head" if model_type == "causal_lm_value_head" else "sequence_classification"


def reward_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, float32."""
    return (
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()
    )


# ---------------------------------------------------------------- loss and metrics


def agreement(margin: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(agreement, counted) per pair: 1 when the reward prefers the response the label prefers
    (argmax), 0 when not, 0.5 for a zero margin; labels of exactly 0.5 (ties) and NaN do not count."""
    counted = ~torch.isnan(label) & (label != 0.5)
    agree = torch.where(margin == 0, 0.5, ((margin > 0) == (label > 0.5)).float())
    return agree * counted, counted.float()


def preference_sums(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    p: torch.Tensor,
    human: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Sums that add up across batches and processes: loss, pairs, AI-label agreement and count,
    human-label agreement and count, margin."""
    margin = r_chosen - r_rejected
    ai, ai_n = agreement(margin, p)
    hu, hu_n = agreement(margin, human)
    parts = [soft_label_loss(r_chosen, r_rejected, p), torch.ones_like(p), ai, ai_n, hu, hu_n, margin]
    return torch.stack([(x.double() * weight).sum() for x in parts])


def metrics_from_sums(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    loss, n, ai, ai_n, hu, hu_n, margin = sums.tolist()
    metrics = {f"{prefix}/loss": loss / max(n, 1), f"{prefix}/accuracy": ai / ai_n if ai_n else math.nan}
    if hu_n:
        metrics[f"{prefix}/human_accuracy"] = hu / hu_n
    metrics[f"{prefix}/margin"] = margin / max(n, 1)
    if prefix == "eval":  # how many held-out pairs the accuracy is over (its CI in the report)
        metrics["eval/pairs"] = ai_n
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[PreferenceExample],
    tokenizer: Any,
    config: RewardConfig,
    accelerator: Any,
    chat: bool = False,
) -> dict[str, float]:
    """Held-out loss, accuracy against the AI label (argmax p) and, where known, the human label."""
    model.eval()
    shard = eval_shard(len(examples), accelerator.process_index, accelerator.num_processes)
    sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    batch_size = config.eval_batch_size or config.batch_size
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        chunk_examples = [examples[i] for i, _ in chunk]
        batch = collate(chunk_examples, tokenizer, config.max_length, chat, config.pad_to_multiple_of).to(
            accelerator.device
        )
        rewards = reward_of(model, batch.input_ids, batch.attention_mask)
        r_chosen, r_rejected = rewards.chunk(2)
        weight = torch.tensor([c for _, c in chunk], dtype=torch.float64, device=accelerator.device)
        sums += preference_sums(r_chosen, r_rejected, batch.p, batch.human, weight)
    model.train()
    return metrics_from_sums(accelerator.reduce(sums, "sum"), "eval")


# ---------------------------------------------------------------- training


@one_writer_per_output_dir
def train_reward_model(config: RewardConfig, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly."""
    run = start_run(config, resume, load_preference_examples)
    accelerator, output_dir, checkpoint, source = run.accelerator, run.output_dir, run.checkpoint, run.source
    train_set, held_out = run.train_set, run.held_out
    tokenizer = load_tokenizer(source, config.revision, config.trust_remote_code)
    model = load_reward_backbone(
        run.weights, config.model_type, tokenizer, config.revision, config.trust_remote_code
    )
    model = apply_lora(model, config, checkpoint, _lora_task(config.model_type))
    chat = resolve_chat_template(tokenizer, config.chat_template, config.model)

    lengths = (
        pair_lengths(tokenizer, train_set, config.max_length, False, chat) if config.group_by_length else None
    )
    loader = ShardedBatches(
        len(train_set),
        config.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        config.seed,
        lengths,
    )
    parts = start_steps(
        config,
        accelerator,
        model,
        loader,
        len(train_set),
        output_dir,
        checkpoint,
        "reward model",
        show_progress,
    )
    model, logger, total_steps = parts.model, parts.logger, parts.total_steps
    logger.print(
        parts.plan_line(f"Reward model ({config.model_type})", "pairs", len(train_set), len(held_out), chat)
    )
    last_checkpoint = checkpoint.path if checkpoint else None
    first_metrics = final_metrics = None
    if parts.start_step == 0 and held_out:
        first_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
        parts.log_held_out(0, first_metrics, last_checkpoint)

    throughput = parts.throughput = Throughput()  # training time starts here, after the first evaluation
    model.train()
    try:
        for step in range(parts.start_step + 1, total_steps + 1):
            sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
            samples, tokens, ids = 0, 0, list[str]()
            for _ in range(config.grad_accum_steps):
                chunk = [train_set[i] for i in loader.next_batch()]
                batch = collate(chunk, tokenizer, config.max_length, chat, config.pad_to_multiple_of)
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                    rewards = reward_of(
                        model, batch.input_ids, batch.attention_mask
                    )  # chosen and rejected at once
                    r_chosen, r_rejected = rewards.chunk(2)
                    loss = soft_label_loss(r_chosen, r_rejected, batch.p).mean()
                    accelerator.backward(loss)  # divides by grad_accum_steps
                ones = torch.ones_like(batch.p, dtype=torch.float64)
                sums += preference_sums(r_chosen.detach(), r_rejected.detach(), batch.p, batch.human, ones)
                samples, tokens = samples + len(chunk), tokens + batch.n_tokens
                ids.extend(x.id for x in chunk)

            # One all-reduce for the log: loss/accuracy sums, samples and tokens over all processes.
            totals = accelerator.reduce(torch.cat([sums, sums.new_tensor([samples, tokens])]), "sum")
            train_metrics = metrics_from_sums(totals[:7], "train")
            metrics = {k: v for k, v in train_metrics.items() if not math.isnan(v)}
            finish_step(parts, step, train_metrics["train/loss"], metrics, totals[7].item(), totals[8].item(), ids,
                        last_checkpoint, f"loss {train_metrics['train/loss']:.4f}")  # fmt: skip

            if held_out and parts.eval_due(step):
                final_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
                parts.log_held_out(step, final_metrics, last_checkpoint)
            if parts.save_due(step):
                last_checkpoint = parts.save(step, tokenizer)
                if accelerator.is_main_process:
                    _write_metadata(last_checkpoint / "model", config, chat)
            throughput.started = time.perf_counter()  # eval and saving are not training time
    finally:
        logger.close()

    if final_metrics is None and held_out:  # resumed a finished run
        final_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
    return parts.finish(
        tokenizer, "reward model", first_metrics, final_metrics,
        note=" (load it with RewardModel.from_pretrained)",
        write_extra=lambda model_dir: _write_metadata(model_dir, config, chat),
    )  # fmt: skip


def _write_metadata(directory: Path, config: RewardConfig, chat: bool) -> None:
    meta = {
        "model_type": config.model_type,
        "max_length": config.max_length,
        "chat_template": chat,  # resolved: RewardModel renders prompts the same way
        "trained_by": "openrlaif train rm",
    }
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- loading a trained reward model


class RewardModel:
    """A trained reward model that scores text: `score(prompts, responses) -> tensor`.

    Loads a folder written by `openrlaif train rm`, or any HF sequence-classification model with
    one output. Texts are tokenized with the reward model's own tokenizer, so the policy may use
    another one (`score_generations` decodes the policy's tokens first).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        chat: bool = False,
        pad_multiple: int = 1,
        dtype: str = "auto",
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)
        self.chat = chat  # prompts rendered with the chat template, as in training
        self.pad_multiple = pad_multiple  # batches padded to a multiple of this many tokens
        # float32 weights; bf16 autocast where the hardware runs it natively (`dtype: auto`)
        self.precision = choose_precision(dtype, self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        pad_multiple: int = 1,
        dtype: str = "auto",
    ) -> RewardModel:
        quiet_transformers()
        path = Path(path)
        meta_file = path / METADATA_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        model_type = meta.get("model_type", "sequence_classification")
        base = adapter_base(path)  # LoRA adapters alone (`lora.export: adapter`): on their base model
        model = load_reward_backbone(
            base or str(path), model_type, tokenizer, trust_remote_code=trust_remote_code
        )
        if base is not None:
            model = attach_adapter_folder(model, path, _lora_task(model_type))
        # a folder without the setting (another trainer's classifier) gets plain text
        chat = bool(meta.get("chat_template", False))
        return cls(model, tokenizer, int(meta.get("max_length", 512)), device, chat, pad_multiple, dtype)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16
    ) -> torch.Tensor:
        """r(prompt, response) for each pair, float32 on the CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = []
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = encode_texts(
                self.tokenizer,
                prompts[start : start + batch_size],
                responses[start : start + batch_size],
                self.max_length,
                self.chat,
                self.pad_multiple,
            )
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision.bf16):
                rewards = reward_of(self.model, input_ids.to(self.device), attention_mask.to(self.device))
            out.append(rewards.cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score_generations(
        self,
        prompts: Sequence[Prompt],
        response_ids: Sequence[Sequence[int]],
        policy_tokenizer: Any,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Score responses given as the policy's token ids: decoded with the policy's tokenizer
        (special tokens such as EOS/padding dropped), then re-tokenized with the reward model's."""
        texts = policy_tokenizer.batch_decode([list(ids) for ids in response_ids], skip_special_tokens=True)
        return self.score(prompts, [t.strip() or t for t in texts], batch_size)
