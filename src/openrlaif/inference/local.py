"""Sampling from a policy in process (transformers), one seed per sample.

`sample()` returns token ids as well as text, so RL can compute log-probabilities of exactly what
was sampled; the K samples of a prompt share its encoding (one forward over each distinct prompt,
its KV cache copied to the K rows). `openrlaif generate` runs the same code through `prepare_rows`
and `iter_samples`, a batch at a time, writing as it goes.

Reproducibility: every sample has its own seed, a hash of (seed, prompt id, sample index). Each
row of a batch draws its randomness from its own `torch.Generator`: generate runs greedy over
logits plus per-row Gumbel noise, and argmax(logits / T + Gumbel) is an exact sample from
softmax(logits / T) (the Gumbel-max trick). A shared generator (`do_sample=True`) would make a
row's sample depend on its neighbours in the batch. So a sample does not depend on the batch size,
on the other prompts, or on which samples a resumed run still has to make (up to floating-point
differences between batch shapes, which flip a token only at a near-exact tie). A server sampler
(`inference.server`) sends the same derived seed in the request's `seed`.

torch and transformers are imported inside the functions that use them (they take seconds to
import): commands that never sample start without them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

from openrlaif.data.chat import encode_prompt, use_chat_template
from openrlaif.data.records import Prompt
from openrlaif.errors import GenerationError
from openrlaif.models.kv import accepts_logits_to_keep, cache_argument, output_cache


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of one sample: a hash of (seed, prompt key, sample index), below 2**31 so every
    server accepts it."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
    """As OpenAI reports it: "stop" when the response ended with an EOS, "length" when it was cut."""
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
        import torch  # heavy: imported on first use (module docstring)

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
    from transformers import (  # heavy: imported on first use (module docstring)
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

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
    from transformers import GenerationConfig  # heavy: imported on first use (module docstring)

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
    import torch  # heavy: imported on first use (module docstring)
    from transformers import DynamicCache

    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    if len(first) == len(prompts) or ids.shape[1] < 2:
        return None
    representative = torch.tensor([index.index(u) for u in range(len(first))], device=ids.device)
    sub_ids, sub_mask = ids[representative, :-1], mask[representative, :-1]
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=sub_ids, attention_mask=sub_mask, position_ids=(sub_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True, **kwargs,
    )  # fmt: skip
    cache = output_cache(out)
    if type(cache) is not DynamicCache:
        return None
    cache.batch_select_indices(torch.tensor(index, device=ids.device))
    return cache


def iter_samples(
    model: Any, tokenizer: Any, rows: Sequence[tuple[list[int], int]], temperature: float, max_new_tokens: int,
    top_p: float = 1.0, batch_size: int = 16, synced: bool = False,
) -> Iterator[list[tuple[int, Sample]]]:  # fmt: skip
    """Sample one response per row (prompt ids, seed), a batch at a time; yields (row index,
    sample) for each batch. Longest prompts go first, so running out of memory happens at once.
    `synced`: the model is sharded across processes (FSDP), so its every forward is a collective:
    each process keeps stepping until all are done (`synced_gpus`), and no prompt cache is shared
    (whether one is depends on the process's rows)."""
    import torch  # heavy: imported on first use (module docstring)
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
            cache = None if synced else shared_prompt_cache(model, ids, mask, [rows[i][0] for i in batch])
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors,
                synced_gpus=synced, **({cache_argument(model): cache} if cache is not None else {}),
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
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], keys: Sequence[str], indices: Sequence[int],
    seed: int, max_new_tokens: int, chat_template: str = "auto",
) -> list[tuple[list[int], int]]:  # fmt: skip
    """(prompt ids, sample seed) per requested sample; a prompt the model has no room for is an error."""
    chat = use_chat_template(tokenizer, chat_template)
    limit = _max_positions(model)
    encoded: dict[Prompt, list[int]] = {}  # each prompt is encoded once, not once per sample
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
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], n: int = 4, temperature: float = 0.9,
    max_new_tokens: int = 128, *, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
    chat_template: Literal["auto", "on", "off"] = "auto", keys: Sequence[str] | None = None, synced: bool = False,
) -> list[Sample]:  # fmt: skip
    """`n` samples per prompt, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].

    Sample k of a prompt is seeded by (seed, key, k), where the key is the prompt's position in
    `prompts` unless `keys` gives ids; the same arguments give the same samples whatever the
    `batch_size`. RL passes a new `seed` each step. `synced`: see `iter_samples`.
    """
    keys = [str(i) for i in range(len(prompts))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    repeated = [(p, k, i) for p, k in zip(prompts, keys, strict=True) for i in range(n)]
    rows = prepare_rows(
        model, tokenizer, [r[0] for r in repeated], [r[1] for r in repeated], [r[2] for r in repeated],
        seed, max_new_tokens, chat_template,
    )  # fmt: skip
    samples: dict[int, Sample] = {}  # batches come longest prompt first: put back in order
    for batch in iter_samples(model, tokenizer, rows, temperature, max_new_tokens, top_p, batch_size, synced):
        samples.update(batch)
    return [samples[i] for i in range(len(rows))]
