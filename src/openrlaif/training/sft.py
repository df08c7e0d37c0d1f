"""Supervised fine-tuning (SFT), top to bottom: maximise log p(completion | prompt).

Data: JSONL/Parquet rows with `prompt` and `completion` (TRL's prompt-completion format, text or
conversational; a `response` field is accepted in place of `completion`, so a responses file
trains as it is), TRL's conversational `messages` (the last, assistant, message the completion), or
the built-in `hh-harmless` (the prompt and the reply people chose). The loss is the mean negative
log-likelihood of the completion tokens: prompt tokens and padding are labeled -100 and carry no
loss, and an EOS token is appended so the policy learns to stop. A held-out split is evaluated
before training, every `eval_every` steps and at the end.

Format (`chat_template`): with a tokenizer that has a chat template ("auto", the default, or "on")
the prompt is rendered as its messages (a conversational prompt's own, system message included;
an HH dialogue's turns; else one user turn) plus the generation prompt, token for token as
`openrlaif generate` and the RL trainer encode it for sampling (`data/chat.py`'s `encode_prompt`), and
the completion follows as the assistant's reply; otherwise ("off", or no template) the prompt
text, a space and the completion. Batches hold examples of similar length (`group_by_length`).

    openrlaif train sft --config configs/train/sft-tiny.yaml [--resume]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from openrlaif.data.chat import (
    ChatTemplate,
    encode_prompt_completions,
    encoded_lengths,
    resolve_chat_template,
)
from openrlaif.data.examples import SFTExample, parse_sft_row
from openrlaif.models.loading import load_pretrained, load_tokenizer
from openrlaif.models.logprobs import IGNORE_INDEX, sequence_logprobs
from openrlaif.training.batching import ShardedBatches, eval_shard, pad_right
from openrlaif.training.config import TrainConfig
from openrlaif.training.metrics import Throughput
from openrlaif.training.run import (
    TrainResult,
    apply_lora,
    one_writer_per_output_dir,
    read_examples,
    start_run,
)
from openrlaif.training.step import finish_step, start_steps


class SFTConfig(TrainConfig):
    """SFT settings (the shared ones are documented on TrainConfig)."""

    method: ClassVar[str] = "sft"

    data: str = "hh-harmless"
    learning_rate: float = Field(2e-5, gt=0.0)
    append_eos: bool = True  # end every completion with EOS so generation learns to stop
    # Batches of examples of similar length (ShardedBatches): less padding, the same examples per
    # epoch. False: plain shuffled batches.
    group_by_length: bool = True
    # Prompts rendered with the tokenizer's chat template (user turn(s) + the generation prompt,
    # exactly as `generate` and RL encode them), the completion as the assistant's reply, then
    # EOS; "auto": when the tokenizer has a template. Off: the prompt text, a space, the completion.
    chat_template: ChatTemplate = "auto"


# ---------------------------------------------------------------- data


def load_sft_examples(source: str, limit: int | None = None) -> list[SFTExample]:
    """A prompt/completion file, or a built-in pairs dataset (prompt + the human-chosen reply)."""
    # A = the chosen reply
    return read_examples(source, limit, lambda p: SFTExample(p.id, p.prompt, p.response_a), parse_sft_row)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # input_ids, with IGNORE_INDEX on prompt tokens and padding
    n_tokens: int  # real (non-pad) tokens, for tokens/s

    def to(self, device: torch.device) -> SFTBatch:
        return SFTBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.n_tokens
        )


def collate(
    examples: list[SFTExample],
    tokenizer: Any,
    max_length: int,
    append_eos: bool,
    chat: bool = False,
    pad_multiple: int = 1,
) -> SFTBatch:
    encoded = encode_prompt_completions(
        tokenizer,
        [x.prompt for x in examples],
        [x.completion for x in examples],
        max_length,
        append_eos,
        chat,
    )
    input_ids = pad_right([ids for ids, _ in encoded], tokenizer.pad_token_id, pad_multiple)
    attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0, pad_multiple)
    labels = input_ids.clone()
    for row, (ids, n_prompt) in enumerate(encoded):
        # by position, not by token id: pad may equal eos, and the appended eos must be learned
        labels[row, :n_prompt] = IGNORE_INDEX
        labels[row, len(ids) :] = IGNORE_INDEX
    return SFTBatch(input_ids, attention_mask, labels, int(attention_mask.sum()))


# ---------------------------------------------------------------- loss and evaluation


def sft_loss(model: torch.nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of the batch."""
    logp_sum, n_tokens = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
    return -logp_sum.sum() / n_tokens.sum().clamp(min=1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[SFTExample],
    tokenizer: Any,
    config: SFTConfig,
    accelerator: Any,
    chat: bool = False,
) -> dict[str, float]:
    """Held-out loss (per completion token) and perplexity, summed over all processes."""
    model.eval()
    shard = eval_shard(len(examples), accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # nll, tokens
    batch_size = config.eval_batch_size or config.batch_size
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        batch = collate(
            [examples[i] for i, _ in chunk],
            tokenizer,
            config.max_length,
            config.append_eos,
            chat,
            config.pad_to_multiple_of,
        )
        batch = batch.to(accelerator.device)
        logp_sum, n_tokens = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        counts = torch.tensor([c for _, c in chunk], dtype=torch.float64, device=accelerator.device)
        totals += torch.stack([-(logp_sum.double() * counts).sum(), (n_tokens.double() * counts).sum()])
    totals = accelerator.reduce(totals, "sum")
    model.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}


# ---------------------------------------------------------------- training


@one_writer_per_output_dir
def train_sft(config: SFTConfig, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly."""
    from transformers import AutoModelForCausalLM  # why: transformers is slow to import

    run = start_run(config, resume, load_sft_examples)
    accelerator, output_dir, checkpoint, source = run.accelerator, run.output_dir, run.checkpoint, run.source
    train_set, held_out = run.train_set, run.held_out
    tokenizer = load_tokenizer(source, config.revision, config.trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, run.weights, config.revision, config.trust_remote_code)
    model = apply_lora(model, config, checkpoint, "causal_lm")
    chat = resolve_chat_template(tokenizer, config.chat_template, config.model)

    lengths = None
    if config.group_by_length:
        prompts, completions = [x.prompt for x in train_set], [x.completion for x in train_set]
        lengths = encoded_lengths(tokenizer, prompts, completions, config.max_length, config.append_eos, chat)
    loader = ShardedBatches(
        len(train_set),
        config.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        config.seed,
        lengths,
    )
    parts = start_steps(
        config, accelerator, model, loader, len(train_set), output_dir, checkpoint, "SFT", show_progress
    )
    model, logger, total_steps = parts.model, parts.logger, parts.total_steps
    logger.print(parts.plan_line("SFT", "examples", len(train_set), len(held_out), chat))
    last_checkpoint = checkpoint.path if checkpoint else None
    first_metrics = final_metrics = None
    if parts.start_step == 0 and held_out:
        first_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
        parts.log_held_out(0, first_metrics, last_checkpoint)

    throughput = parts.throughput = Throughput()  # training time starts here, after the first evaluation
    model.train()
    try:
        for step in range(parts.start_step + 1, total_steps + 1):
            losses, samples, tokens, ids = [], 0, 0, list[str]()
            for _ in range(config.grad_accum_steps):
                chunk = [train_set[i] for i in loader.next_batch()]
                batch = collate(
                    chunk, tokenizer, config.max_length, config.append_eos, chat, config.pad_to_multiple_of
                )
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                    loss = sft_loss(model, batch)
                    accelerator.backward(loss)  # divides by grad_accum_steps
                losses.append(loss.detach())
                samples, tokens = samples + len(chunk), tokens + batch.n_tokens
                ids.extend(x.id for x in chunk)

            # One all-reduce for the log: loss averaged over processes, samples and tokens summed.
            mean_loss = torch.stack(losses).mean().double()
            totals = accelerator.reduce(
                torch.stack([mean_loss, mean_loss.new_tensor(samples), mean_loss.new_tensor(tokens)]), "sum"
            )
            loss_value = totals[0].item() / accelerator.num_processes
            finish_step(parts, step, loss_value, {"train/loss": loss_value}, totals[1].item(), totals[2].item(), ids,
                        last_checkpoint, f"loss {loss_value:.4f}")  # fmt: skip

            if held_out and parts.eval_due(step):
                final_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
                parts.log_held_out(step, final_metrics, last_checkpoint)
            if parts.save_due(step):
                last_checkpoint = parts.save(step, tokenizer)
            throughput.started = time.perf_counter()  # eval and saving are not training time
    finally:
        logger.close()

    if final_metrics is None and held_out:  # resumed a finished run
        final_metrics = evaluate(model, held_out, tokenizer, config, accelerator, chat)
    return parts.finish(tokenizer, "SFT", first_metrics, final_metrics)
