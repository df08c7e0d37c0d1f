"""Label tokens: which vocabulary entries spell a label ("1", "2", "7", "10") right after an ending.

A judge reads P(label) from the next-token distribution after the prompt's ending
(`Preferred Response=`, `SCORE: `). Tokenizers spell the same label in several ways:

- byte-level BPE (GPT-2, Llama 3, Qwen): a bare "1" and a space-merged "Ġ1" (" 1");
- SentencePiece / metaspace (Llama 2, Mistral): "▁1", or, when digits are split, a lone "▁" then
  a bare "1" (so the bare digit is the token that carries the label).

`label_token_ids` collects every *single* token whose text is the label, optionally preceded by
spaces, and the judge sums their probabilities (logsumexp). A label with no single-token spelling is
an error, except in the direct-score scale where "10" is usually two tokens ("1", "0"): there
`score_label_tokens` plans one extra token per row so that
P("10") = P("1") * P("0" | "1") and P("1") = P("1") * (1 - P("0" | "1")).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openrlaif.errors import JudgeError

# Text put in front of a string so that the tokenizer sees it mid-text; "\n" is its own token in
# common tokenizers and stops SentencePiece from adding its start-of-text "▁".
_ANCHOR = "\n"


def encode_continuations(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as it reads when it continues earlier text: no special tokens and
    no start-of-text space. A prompt tokenized in two parts (shared prefix + per-item suffix) would
    otherwise carry a "▁" at the seam that the whole text does not have."""
    if not texts:
        return []
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    anchored = tokenizer([_ANCHOR + t for t in texts], add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    for text, ids in zip(texts, anchored, strict=True):
        if ids[: len(anchor)] == anchor:
            out.append(list(ids[len(anchor) :]))
        else:  # the anchor merged with the text's first characters: plain encoding is the best we have
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    return encode_continuations(tokenizer, [text])[0]


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def _spells(tokenizer: Any, token_id: int, label: str) -> bool:
    """True when the token's text is the label, optionally after spaces ("1", " 1", "▁1")."""
    return _token_text(tokenizer, token_id).lstrip(" ") == label


def label_token_ids(tokenizer: Any, label: str, ending: str = "") -> list[int]:
    """Every single token that spells `label` after `ending`, sorted. Raises JudgeError if none."""
    special = set(tokenizer.all_special_ids)
    candidates: set[int] = set()
    # How the tokenizer itself writes the label: alone, after a space, right after the ending.
    for variant in (label, " " + label, ending + label, ending + " " + label):
        candidates.update(encode_continuation(tokenizer, variant))
        candidates.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    # Spellings the merges above may not produce (e.g. "Ġ1" when the ending ends with a space).
    vocab = tokenizer.get_vocab()
    for piece in (label, "Ġ" + label, "▁" + label):
        if piece in vocab:
            candidates.add(vocab[piece])
    ids = sorted(i for i in candidates if i not in special and _spells(tokenizer, i, label))
    if not ids:
        pieces = tokenizer.convert_ids_to_tokens(encode_continuation(tokenizer, label))
        raise JudgeError(
            f"label {label!r} is not a single token for this tokenizer (it splits into {pieces}); "
            "use single-token labels in the judge template"
        )
    return ids


def canonical_spelling(tokenizer: Any, label: str, ending: str = "") -> list[int]:
    """The tokens the tokenizer writes for `label` right after `ending` (spaces dropped)."""
    base = encode_continuation(tokenizer, ending)
    full = encode_continuation(tokenizer, ending + label)
    rest = full[len(base) :] if full[: len(base)] == base else encode_continuation(tokenizer, label)
    while rest and _token_text(tokenizer, rest[0]).strip(" ") == "":  # a lone "▁" or "Ġ"
        rest = rest[1:]
    return rest


def pair_label_ids(tokenizer: Any, labels: Sequence[str], ending: str) -> list[list[int]]:
    """Token ids for each pairwise label; the two sets must not share a token."""
    ids = [label_token_ids(tokenizer, label, ending) for label in labels]
    if set(ids[0]) & set(ids[1]):
        raise JudgeError(f"labels {labels[0]!r} and {labels[1]!r} share a token; use distinct labels")
    return ids


def label_log_probs(log_probs: torch.Tensor, label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, V] next-token log-probs -> [B, n_labels]: log of the summed probability of each label's tokens."""
    return torch.stack([torch.logsumexp(log_probs[:, list(ids)], dim=-1) for ids in label_ids], dim=-1)


def pair_probability(log_probs: torch.Tensor, label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """P(label 1) from [B, V] next-token log-probs: softmax over the two labels' log-probs."""
    both = label_log_probs(log_probs, label_ids)
    return torch.softmax(both, dim=-1)[:, 0]


@dataclass(frozen=True)
class ScoreTokens:
    """How to read a score scale ("1".."10") from one forward pass.

    Labels with single-token spellings are read at the ending. Labels that take two tokens (usually
    "10") share a first token `lead`, which is appended to every row so the same pass also yields
    P(continuation | lead) at the next position.
    """

    labels: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]  # single-token spellings per label; () for a two-token label
    lead: int | None = None  # first token of the two-token labels
    lead_label: int | None = None  # index of the label that `lead` spells on its own ("1"), if any
    two_token: tuple[tuple[int, int], ...] = ()  # (label index, continuation token id)

    @property
    def values(self) -> list[float]:
        return [float(label) for label in self.labels]


def score_label_tokens(tokenizer: Any, labels: Sequence[str], ending: str) -> ScoreTokens:
    """Plan the tokens of a score scale; see ScoreTokens."""
    ids: list[tuple[int, ...]] = []
    spelled: dict[int, list[int]] = {}  # label index -> its canonical multi-token spelling
    for k, label in enumerate(labels):
        try:
            ids.append(tuple(label_token_ids(tokenizer, label, ending)))
        except JudgeError:
            ids.append(())
            spelled[k] = canonical_spelling(tokenizer, label, ending)
    if not spelled:
        return ScoreTokens(labels=tuple(labels), ids=tuple(ids))
    leads = {tuple(s[:1]) for s in spelled.values()}
    if any(len(s) != 2 for s in spelled.values()) or len(leads) != 1:
        shown = {labels[k]: tokenizer.convert_ids_to_tokens(s) for k, s in spelled.items()}
        raise JudgeError(
            f"score labels {shown} need more than one token in ways one forward pass cannot read "
            "(at most two tokens, all starting with the same token); use single-token scores"
        )
    lead = next(iter(leads))[0]
    lead_label = next((k for k, label_ids in enumerate(ids) if lead in label_ids), None)
    return ScoreTokens(
        labels=tuple(labels),
        ids=tuple(ids),
        lead=lead,
        lead_label=lead_label,
        two_token=tuple((k, s[1]) for k, s in sorted(spelled.items())),
    )


def score_log_distribution(
    next_log_probs: torch.Tensor, after_lead_log_probs: torch.Tensor | None, plan: ScoreTokens
) -> torch.Tensor:
    """[B, n_labels] log P(score), renormalised over the scale.

    next_log_probs: [B, V] after the ending; after_lead_log_probs: [B, V] after the appended lead
    token (only needed when the plan has two-token labels).
    """
    columns = [
        torch.logsumexp(next_log_probs[:, list(ids)], dim=-1)
        if ids
        else torch.full(next_log_probs.shape[:1], float("-inf"), device=next_log_probs.device)
        for ids in plan.ids
    ]
    log_p = torch.stack(columns, dim=-1)
    if plan.lead is not None:
        if after_lead_log_probs is None:
            raise ValueError("this score scale needs the log-probs after the lead token")
        # P(lead) counts every spelling of the lead label ("1" and " 1"), P(continuation | lead) is
        # read after the canonical lead token.
        lead_lp = next_log_probs[:, plan.lead] if plan.lead_label is None else log_p[:, plan.lead_label]
        cont = torch.stack([after_lead_log_probs[:, c] for _, c in plan.two_token], dim=-1)
        for j, (k, _) in enumerate(plan.two_token):
            log_p[:, k] = lead_lp + cont[:, j]
        if plan.lead_label is not None:  # the lead alone means the label it spells, when nothing follows
            p_rest = (1.0 - cont.exp().sum(dim=-1)).clamp_min(0.0)
            log_p[:, plan.lead_label] = lead_lp + torch.log(p_rest)
    return torch.log_softmax(log_p, dim=-1)
