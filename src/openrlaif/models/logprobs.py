"""Log-probabilities of tokens under a causal LM: the SFT loss, DPO, RL and the judge read them.

The LM head's logits are positions x vocabulary: with Gemma 3's 262,144-token vocabulary a batch
of 8 x 256 tokens is 2 GiB of float32, and a backward pass holds several copies of it. So they are
never made whole: `lm_forward` runs the model with its head projecting one position only and
hands back what the head would have projected (`HeadInput`: the final hidden states and the
head's weights); `token_logprobs` then projects a chunk of positions at a time (at most
`logits_chunk_mib` of float32 logits), and the backward pass recomputes each chunk's logits
instead of keeping them (`torch.utils.checkpoint`). The numbers are the plain computation's up to
float rounding (tests/test_logprobs.py).

Where the logits are not the head's plain projection of the hidden states (a model that softcaps
or scales them, an LM head that is not a plain `nn.Linear`, a head whose weights are sharded
again after the forward), `lm_forward` finds out on its first call, with a few tokens, and returns
the model's own logits from then on. Every later call checks the one position the head still
projects against its own projection of it.

- `IGNORE_INDEX`: the label of tokens that carry no log-prob (prompt, padding), as in Hugging Face.
- `lm_forward(model, **inputs)`: (the model's output, its logits as `Logits`).
- `token_logprobs(logits, labels)`: log p(label) at each position, in float32;
  `token_logprobs_and_entropy` also the entropy of each position's distribution (no gradient).
- `sequence_logprobs`: the summed log-probs of each sequence's labeled tokens.
- `logits_chunk_mib(mib)`: the chunk size in effect within (the trainers' `logits_chunk_mib`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in Hugging Face models

DEFAULT_CHUNK_MIB = 256.0
_chunk_mib: ContextVar[float | None] = ContextVar("logits_chunk_mib", default=DEFAULT_CHUNK_MIB)
# heads checked on first use: True when the model's logits are their plain projection
_plain_heads: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def logits_chunk_mib(mib: float | None) -> Iterator[None]:
    """Within: logits are projected at most `mib` MiB of float32 at a time (None: all at once)."""
    token = _chunk_mib.set(mib)
    try:
        yield
    finally:
        _chunk_mib.reset(token)


@dataclass(frozen=True)
class HeadInput:
    """Logits not yet computed: the hidden states the LM head projects (..., H) and the head's
    weight (V, H) and bias. Indexed like the logits over every dimension but the last."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __getitem__(self, key: Any) -> HeadInput:
        return replace(self, hidden=self.hidden[key])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    def project(self) -> torch.Tensor:
        """The logits themselves, all at once (for a few positions)."""
        return F.linear(self.hidden, self.weight, self.bias)


Logits = torch.Tensor | HeadInput


def cat_logits(parts: Sequence[Logits], dim: int) -> Logits:
    """`torch.cat` of logits along a dimension other than the vocabulary's."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts), dim)  # type: ignore[arg-type]
    heads = [p for p in parts if isinstance(p, HeadInput)]
    assert len(heads) == len(parts), "logits of one model are all HeadInput or all tensors"
    return replace(heads[0], hidden=torch.cat([h.hidden for h in heads], dim))


def lm_forward(model: torch.nn.Module, **inputs: Any) -> tuple[Any, Logits]:
    """`model(**inputs)` and its logits, as a `HeadInput` where the head is a plain projection
    (see the module docstring), else the model's own logits tensor. The output's own `logits`
    then hold only the last position."""
    head = _output_head(model)
    if head is None:
        output = model(**inputs)
        return output, output.logits
    if head not in _plain_heads:
        _plain_heads[head] = _projects_plainly(model, head, inputs)
    if not _plain_heads[head]:
        output = model(**inputs)
        return output, output.logits
    captured: list[torch.Tensor] = []

    def project_last_position_only(_: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][..., -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(project_last_position_only)
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    logits = HeadInput(captured[-1], head.weight, head.bias)
    if not _same_logits(output.logits[:1], logits[:1, ..., -1:, :]):  # one row suffices
        raise RuntimeError(
            f"the LM head of {type(_unwrapped(model)).__name__} no longer gives the logits it gave when "
            "first checked; set logits_chunk_mib: null to take the model's own logits"
        )
    return output, logits


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model as `.module`


def _output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head, when chunking is on and the head is an `nn.Linear`."""
    if _chunk_mib.get() is None:
        return None
    get = getattr(_unwrapped(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Linear) else None


def _same_logits(expected: torch.Tensor, logits: HeadInput) -> bool:
    from torch.distributed.tensor import DTensor  # why: only here, and torch.distributed is large

    if isinstance(logits.weight, DTensor) or expected.shape != logits.shape:
        return False  # weights sharded again after the forward (FSDP) cannot be used outside it
    # NaN where the model gives NaN (broken weights): the loss's own check then names the step
    return bool(
        torch.allclose(expected.float(), logits.project().float(), rtol=1e-3, atol=1e-3, equal_nan=True)
    )


@torch.no_grad()
def _projects_plainly(model: torch.nn.Module, head: torch.nn.Linear, inputs: dict[str, Any]) -> bool:
    """Whether the model's logits are `head`'s plain projection of what it gets: one pass over a
    few tokens of the first row, the head projecting every position. (A forward of a sharded
    model is a collective: every process makes this first call at the same point.)"""
    ids = inputs.get("input_ids")
    if ids is None or ids.numel() == 0:
        return False
    inner, captured = _unwrapped(model), list[torch.Tensor]()
    handle = head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    training = inner.training
    inner.eval()  # no dropout: this pass must not draw from the RNG, or a resumed run would differ
    try:
        logits = inner(input_ids=ids[:1, :8], use_cache=False).logits
    finally:
        inner.train(training)
        handle.remove()
    return len(captured) == 1 and _same_logits(logits, HeadInput(captured[0], head.weight, head.bias))


# ---------------------------------------------------------------- log-probs from logits


def _logprobs_of(logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool) -> torch.Tensor:
    """(..., 1 or 2): log p(label) (0 where IGNORE_INDEX) and, with_entropy, the entropy (no
    gradient) at each position of `logits` (..., V). In float32: logsumexp in bf16 loses too much."""
    mask = labels != IGNORE_INDEX
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, labels.masked_fill(~mask, 0)[..., None]).squeeze(-1)
    out = [(picked - lse) * mask]
    if with_entropy:
        with torch.no_grad():
            out.append(lse - (torch.softmax(logits, -1) * logits).sum(-1))
    return torch.stack(out, -1)


def _head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, with_entropy: bool
) -> torch.Tensor:  # fmt: skip
    return _logprobs_of(F.linear(hidden, weight, bias), labels, with_entropy)


def _chunked(logits: Logits, labels: torch.Tensor, with_entropy: bool) -> torch.Tensor:
    """(..., 1 or 2) as `_logprobs_of`, over positions of any shape; a HeadInput is projected a
    chunk of positions at a time, each chunk's logits recomputed in the backward pass."""
    if isinstance(logits, torch.Tensor):
        return _logprobs_of(logits, labels, with_entropy)
    hidden = logits.hidden.reshape(-1, logits.hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    mib = _chunk_mib.get()
    vocab = logits.weight.shape[0]
    rows = len(hidden) if mib is None else max(1, int(mib * 2**20) // (4 * vocab))
    if rows >= len(hidden):
        out = _head_logprobs(hidden, logits.weight, logits.bias, flat_labels, with_entropy)
        return out.reshape(*labels.shape, -1)
    from torch.utils.checkpoint import checkpoint  # why: loaded only when chunking

    grad = torch.is_grad_enabled() and (hidden.requires_grad or logits.weight.requires_grad)
    parts = []
    for start in range(0, len(hidden), rows):
        args = (hidden[start : start + rows], logits.weight, logits.bias, flat_labels[start : start + rows])
        if grad:
            parts.append(checkpoint(_head_logprobs, *args, with_entropy, use_reentrant=False))
        else:
            parts.append(_head_logprobs(*args, with_entropy))
    return torch.cat(parts).reshape(*labels.shape, -1)


def token_logprobs(logits: Logits, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each position (logits (..., V) aligned with labels (...)), float32; 0
    where the label is IGNORE_INDEX."""
    return _chunked(logits, labels, with_entropy=False)[..., 0]


def token_logprobs_and_entropy(logits: Logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs`, and the entropy of each position's distribution (no gradient), from one
    projection of the logits."""
    both = _chunked(logits, labels, with_entropy=True)
    return both[..., 0], both[..., 1]


def sequence_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the labeled tokens of each sequence, and their count: (B,), (B,).

    `labels` is `input_ids` with IGNORE_INDEX where no log-prob is wanted (prompt, padding).
    Position t predicts token t+1, so logits and labels are shifted by one.
    """
    _, logits = lm_forward(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    targets = labels[:, 1:]
    logp = token_logprobs(logits[:, :-1], targets)
    return logp.sum(-1), (targets != IGNORE_INDEX).sum(-1)
