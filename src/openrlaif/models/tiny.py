"""Tiny causal LMs built locally from configs: no model hub needed.

Tests, benchmarks and the quickstart need real `transformers` models and tokenizers on a machine
that cannot download any. This module trains a small tokenizer on the shipped HH-RLHF dialogues
and builds a randomly initialised model of a real architecture around it:

- `gpt2`: byte-level BPE (digits merge with a leading space, as in GPT-2: " 1").
- `llama`: SentencePiece-style metaspace BPE with digits split one by one (as in Llama), and a
  chat template, so chat-template code paths get exercised.

Everything is saved with `save_pretrained`, so it loads like any Hugging Face model folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from openrlaif.data.chat import prompt_text
from openrlaif.data.datasets import load_pairs

Arch = Literal["gpt2", "llama", "gemma3"]  # gemma3: sliding-window and full attention layers, as Gemma 3

LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def hh_corpus(limit: int | None = None) -> list[str]:
    """Prompts and replies of the shipped HH-RLHF pairs, as tokenizer training text."""
    texts: list[str] = []
    for pair in load_pairs("hh-harmless").records[:limit]:
        texts += [prompt_text(pair.prompt), pair.response_a, pair.response_b]
    return texts


def train_tokenizer(texts: Iterable[str], arch: Arch, vocab_size: int = 1024):  # -> PreTrainedTokenizerFast
    # why: tokenizers and transformers are slow to import, and only building a model needs them
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<|endoftext|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        )  # fmt: skip
    if arch == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
        alphabet = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\"-:;()=\n▁")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet
        )
        tok.train_from_iterator(texts, trainer)
        from tokenizers import processors  # why: as above

        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        )  # fmt: skip
        fast.chat_template = LLAMA_CHAT_TEMPLATE
        return fast
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_causal_lm(
    out_dir: str | Path,
    arch: Arch = "gpt2",
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 2048,
    seed: int = 0,
    texts: list[str] | None = None,
    sliding_window: int = 16,
) -> Path:
    """Train a tokenizer, build a random-weight model of `arch`, save both to `out_dir`.

    `gemma3` has Gemma 3's layer pattern (sliding-window layers, the last one full attention; a
    window of `sliding_window` tokens, short so that tests cross it) and, as the base Gemma 3
    models, no chat template."""
    # why: torch and transformers are slow to import, and only building a model needs them
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out_dir)
    tokenizer = train_tokenizer(
        texts if texts is not None else hh_corpus(), "gpt2" if arch == "gpt2" else "llama", vocab_size
    )
    torch.manual_seed(seed)
    model: GPT2LMHeadModel | LlamaForCausalLM | Gemma3ForCausalLM
    if arch == "gpt2":
        gpt2 = GPT2Config(
            vocab_size=len(tokenizer), n_positions=max_positions, n_embd=hidden_size, n_layer=num_layers,
            n_head=num_heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        model = GPT2LMHeadModel(gpt2)
    elif arch == "gemma3":
        tokenizer.chat_template = None
        gemma = Gemma3TextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
            head_dim=hidden_size // num_heads, max_position_embeddings=max_positions, sliding_window=sliding_window,
            layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        model = Gemma3ForCausalLM(gemma)
    else:
        llama = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        model = LlamaForCausalLM(llama)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
