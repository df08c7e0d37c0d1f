"""Train the shipped base policy `builtin:hh-tiny-gpt`: a small GPT-2 and its tokenizer, from scratch,
on the shipped Anthropic HH-RLHF harmless dialogues. Run once by a maintainer; the result is committed
under src/openrlaif/data/builtin/hh-tiny-gpt/ so the quickstart needs no model hub.

    .venv/bin/python scripts/train_base_policy.py            # about 10-15 minutes on one CPU thread

Data split (the rule every stage follows, `openrlaif.data.datasets.hh_harmless_split`): the pairs
from source lines 1-1200 of `harmless-base-1800.jsonl.gz` are the TRAIN part, lines 1201-1800 the
EVAL part (less the one pair there whose prompt also occurs in lines 1-1200). Only train-part dialogues are seen here (both the chosen and the rejected dialogue of each
pair, as `prompt + " " + reply`, the text the SFT stage sees), by the tokenizer and by the model;
eval-part dialogues give the held-out loss and perplexity, and eval-part prompts the samples.

What it does, deterministically for a given seed, thread count and precision:
1. byte-level BPE tokenizer (`tokenizers`, GPT-2 style) with `<|endoftext|>` (bos/eos/unk) and
   `<|pad|>`, saved as a transformers `PreTrainedTokenizerFast`;
2. a GPT-2 causal LM (tied embeddings) pretrained on the train dialogues, shuffled each epoch and
   packed into full context windows with EOS between dialogues: AdamW, warmup + cosine schedule,
   a fixed token budget, bf16 autocast where the CPU runs it natively (measured 2x faster than fp32
   on an AVX512-BF16 CPU; weights and optimizer state stay fp32);
3. held-out loss before/after, a few sampled continuations, then the folder is saved with fp16
   weights (half the size; loaders in openrlaif read it back as fp32), a generation config, a
   MODEL_CARD.md with the measured numbers and training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizer trainer's threads; set before import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from openrlaif.data.chat import completion_text  # noqa: E402
from openrlaif.data.datasets import BUILTIN_DIR, HH_HARMLESS_TRAIN_LINES, hh_harmless_split  # noqa: E402

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_OUT = BUILTIN_DIR / "hh-tiny-gpt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--context", type=int, default=512, help="positions (98%% of eval prompts fit in 512)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training token budget")
    p.add_argument("--batch-size", type=int, default=8, help="context windows per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--eval-every", type=int, default=50, help="steps between quick held-out checks")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def dialogues(part: str) -> list[str]:
    """Both full dialogues of every pair of one part, as the pipeline's SFT joins them."""
    out = []
    for pair in hh_harmless_split(part):  # type: ignore[arg-type]
        for reply in (pair.response_a, pair.response_b):
            out.append(pair.prompt + completion_text(pair.prompt, reply))
    return out


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
        model_max_length=context, clean_up_tokenization_spaces=False,
    )  # fmt: skip


def packed_windows(docs: list[list[int]], eos: int, context: int, rng: random.Random) -> torch.Tensor:
    """One epoch: the documents shuffled, joined with EOS after each, cut into full windows (the
    last partial window is dropped)."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += docs[i] + [eos]
    n = len(stream) // context
    return torch.tensor(stream[: n * context], dtype=torch.long).view(n, context)


def eval_batches(docs: list[list[int]], eos: int, pad: int, context: int, tokens_per_batch: int = 8192):
    """Each held-out dialogue alone from position 0 (as a prompt is at generation), + EOS, cut to
    the context; batches of similar lengths, right-padded, padding labeled -100."""
    seqs = sorted(((d + [eos])[:context] for d in docs), key=len, reverse=True)
    batches, i = [], 0
    while i < len(seqs):
        n = max(1, tokens_per_batch // len(seqs[i]))  # the longest of the batch sets its width
        chunk = seqs[i : i + n]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
        i += n
    return batches


@torch.no_grad()
def held_out_loss(model: Any, batches: list, autocast: bool) -> float:
    """Mean negative log-likelihood per predicted token (nats)."""
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((targets != -100).sum())
    model.train()
    return total / count


# ---------------------------------------------------------------- training


def use_bf16(precision: str) -> bool:
    if precision != "auto":
        return precision == "bf16"
    native = [
        getattr(torch.cpu, n, lambda: False)()
        for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(native)


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not biases or LayerNorm
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def show_samples(model: Any, tokenizer: Any, prompts: list[str], seed: int) -> list[dict[str, str]]:
    from openrlaif.inference.local import sample

    got = sample(model, tokenizer, prompts, n=1, temperature=0.8, max_new_tokens=60, top_p=0.95, seed=seed)
    rows = []
    for prompt, s in zip(prompts, got, strict=True):
        last_turn = prompt.rsplit("Human:", 1)[-1].removesuffix("\n\nAssistant:").strip()
        rows.append({"human": last_turn, "assistant": s.response_text})
        print(f"  Human: {last_turn}\n  Assistant: {s.response_text!r}\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight loading/writing bars would interleave with ours
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()

    train_texts, eval_texts = dialogues("train"), dialogues("eval")
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.context)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    train_docs = tokenizer(train_texts, add_special_tokens=False)["input_ids"]
    eval_docs = tokenizer(eval_texts, add_special_tokens=False)["input_ids"]
    train_tokens = sum(len(d) + 1 for d in train_docs)
    print(
        f"data: {len(train_texts)} train dialogues ({train_tokens:,} tokens with EOS), "
        f"{len(eval_texts)} held-out dialogues; tokenizer: {len(tokenizer)} tokens "
        f"({sum(len(t) for t in train_texts) / train_tokens:.2f} chars/token)"
    )

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.context, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    bf16 = use_bf16(args.precision)
    steps = max(1, args.tokens // (args.batch_size * args.context))
    warmup = max(1, int(args.warmup_ratio * steps))
    print(
        f"model: GPT-2 {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, {args.context} "
        f"positions, {params:,} parameters; {steps} steps x {args.batch_size} x {args.context} tokens "
        f"= {steps * args.batch_size * args.context:,} tokens ({steps * args.batch_size * args.context / train_tokens:.1f} "
        f"epochs); {'bf16 autocast' if bf16 else 'fp32'}; {args.threads} thread(s)"
    )

    full_eval = eval_batches(eval_docs, eos, pad, args.context)
    quick_eval = eval_batches(eval_docs[::8], eos, pad, args.context)  # every 8th: a cheap trend line
    loss_before = held_out_loss(model, full_eval, autocast=False)  # fp32, as openrlaif loads it
    print(f"held-out loss before training: {loss_before:.3f} (perplexity {math.exp(loss_before):,.0f})")

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    data_rng = random.Random(args.seed)
    windows = packed_windows(train_docs, eos, args.context, data_rng)
    cursor, epoch = 0, 0
    history: list[dict[str, float]] = []
    progress = None
    if not args.no_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"))  # fmt: skip
        task = progress.add_task("pretraining", total=steps, info="")
        progress.start()
    train_started, running = time.time(), None
    model.train()
    for step in range(steps):
        if cursor + args.batch_size > len(windows):  # next epoch: a new shuffle
            windows, cursor, epoch = packed_windows(train_docs, eos, args.context, data_rng), 0, epoch + 1
        batch = windows[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_at(step, steps, warmup, args.min_lr_ratio)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise SystemExit(f"step {step}: the loss is {loss.item()}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step + 1
        row: dict[str, float] = {}
        if done % args.eval_every == 0 or done == steps:
            row = {
                "step": done,
                "train_loss": running,
                "held_out_loss_subset": held_out_loss(model, quick_eval, bf16),
            }
            history.append(row)
        if progress is not None:
            info = f"loss {running:.3f}" + (f" held-out {row['held_out_loss_subset']:.3f}" if row else "")
            progress.update(task, advance=1, info=info)
        elif done % args.log_every == 0 or row:
            rate = done * args.batch_size * args.context / (time.time() - train_started)
            extra = f" held-out(subset) {row['held_out_loss_subset']:.3f}" if row else ""
            print(
                f"step {done}/{steps} epoch {epoch} loss {running:.3f}{extra} ({rate:,.0f} tokens/s)",
                flush=True,
            )
    if progress is not None:
        progress.stop()
    train_seconds = time.time() - train_started

    # Save with fp16 weights, then measure what was saved (fp16 rounding included).
    # Built in a temp folder and moved into place at the end: the shipped model is never half-written.
    final: Path = args.out
    out = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(out, ignore_errors=True)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, do_sample=True, temperature=0.9, top_p=0.95,
        max_new_tokens=128,
    )  # fmt: skip
    model.half().save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    loss_after = held_out_loss(saved, full_eval, autocast=False)
    print(
        f"held-out loss after training (saved fp16 weights, fp32 math): {loss_after:.3f} "
        f"(perplexity {math.exp(loss_after):.1f}); training took {train_seconds / 60:.1f} min"
    )
    eval_pairs = hh_harmless_split("eval")
    prompts = [p.prompt for p in eval_pairs if p.prompt.count("Human:") == 1][:6]
    print("samples (held-out prompts, temperature 0.8, top_p 0.95):")
    samples = show_samples(saved, tokenizer, prompts, args.seed)

    command = "python scripts/train_base_policy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    facts = {
        "command": command.strip(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "train_lines": f"1-{HH_HARMLESS_TRAIN_LINES}",
        "train_dialogues": len(train_texts),
        "eval_dialogues": len(eval_texts),
        "train_tokens_per_epoch": train_tokens,
        "tokens_seen": steps * args.batch_size * args.context,
        "steps": steps,
        "parameters": params,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "train_seconds": round(train_seconds, 1),
        "total_seconds": None,
        "held_out_loss_before": round(loss_before, 4),
        "held_out_loss_after": round(loss_after, 4),
        "held_out_perplexity_after": round(math.exp(loss_after), 2),
        "history": history,
        "samples": samples,
        "torch": torch.__version__,
    }
    facts["total_seconds"] = round(time.time() - started, 1)
    (out / "training.json").write_text(
        json.dumps(facts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "MODEL_CARD.md").write_text(model_card(facts, config, len(tokenizer)), encoding="utf-8")
    for f in out.iterdir():
        f.chmod(0o644)  # the weights file is written 0600; an installed package must be readable by all
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(out, final)
    print(f"saved {final} ({size / 1e6:.1f} MB); total {facts['total_seconds'] / 60:.1f} min")
    return 0


def model_card(f: dict[str, Any], config: Any, vocab: int) -> str:
    samples = "\n\n".join(  # verbatim: the base model's newlines and later turns are part of it
        f"```text\nHuman: {s['human']}\n\nAssistant: {s['assistant']}\n```" for s in f["samples"][:4]
    )
    return f"""# hh-tiny-gpt: the shipped base policy (`builtin:hh-tiny-gpt`)

A {f["parameters"] / 1e6:.1f}M-parameter GPT-2 and its byte-level BPE tokenizer ({vocab} tokens), both
trained from scratch by openrlaif on the shipped Anthropic HH-RLHF harmless dialogues. It is the
quickstart's starting policy: small enough to SFT and RL on two CPU cores in minutes. It writes
dialogue-shaped English, not good answers, and it learned from red-team conversations, so it can
produce offensive text: it exists to be aligned, not to be used.

Load it by name in any openrlaif config (`model: builtin:hh-tiny-gpt`), or as a Hugging Face folder
(`AutoModelForCausalLM.from_pretrained(<this folder>)`).

## Training
- Command: `{f["command"]}` (deterministic for a given seed, thread count and precision).
- Data: the pairs of source lines {f["train_lines"]} of `../harmless-base-1800.jsonl.gz` (the TRAIN
  part, `openrlaif.data.datasets.hh_harmless_split("train")`), both the chosen and the rejected
  dialogue of each: {f["train_dialogues"]} dialogues, {f["train_tokens_per_epoch"]:,} tokens per epoch.
  Lines 1201-1800 (the EVAL part, {f["eval_dialogues"]} dialogues; one pair there whose prompt also
  occurs in lines 1-1200 is left out of it) were never trained on, by the tokenizer or the model;
  evaluation prompts come from there.
- Tokenizer: byte-level BPE (GPT-2 style, no unknown bytes), `<|endoftext|>` = bos/eos/unk,
  `<|pad|>` = padding.
- Model: GPT-2, {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, {config.n_positions}
  positions, tied input/output embeddings, dropout {config.resid_pdrop}.
- Optimisation: {f["steps"]} AdamW steps (betas 0.9/0.95, weight decay {f["args"]["weight_decay"]}) of
  {f["args"]["batch_size"]} x {config.n_positions} packed tokens (dialogues shuffled each epoch, EOS between
  them), peak learning rate {f["args"]["lr"]} with {f["args"]["warmup_ratio"]:.0%} warmup and a cosine
  decay to {f["args"]["min_lr_ratio"]:.0%} of it, gradient clipping 1.0, {f["precision"]}; {f["tokens_seen"]:,}
  tokens seen ({f["tokens_seen"] / f["train_tokens_per_epoch"]:.1f} epochs).
- Time: {f["train_seconds"] / 60:.1f} min of training ({f["tokens_seen"] / f["train_seconds"]:,.0f} tokens/s),
  {f["total_seconds"] / 60:.1f} min in all, on one CPU thread (torch {f["torch"]}) of a machine busy
  with other jobs; an idle core is faster.
- Weights are stored as float16 safetensors (openrlaif loads them as float32).

## Measured
- Held-out loss (eval-part dialogues, each from position 0, nats per token): {f["held_out_loss_before"]:.3f}
  before training (random init), {f["held_out_loss_after"]:.3f} after (perplexity {f["held_out_perplexity_after"]:.1f}),
  measured on the saved float16 weights. Curve: `training.json`.
- Samples for held-out prompts (temperature 0.8, top-p 0.95, 60 new tokens; the base model keeps
  writing further turns, the SFT stage teaches it to stop):

{samples}

## License
The training data is Anthropic's HH-RLHF (https://github.com/anthropics/hh-rlhf), MIT license; see
`../hh-rlhf-LICENSE` and `../hh-rlhf-SOURCE.md`. The weights and tokenizer are derived from it and
shipped with openrlaif under its Apache-2.0 license, with the MIT notice of the data kept.
"""


if __name__ == "__main__":
    raise SystemExit(main())
