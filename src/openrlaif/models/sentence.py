"""Sentence embeddings (the `embedding` judge's): unit-length vectors of texts from a
sentence-transformers model.

A local sentence-transformers folder made of the usual three modules (a transformers encoder,
mean, CLS or max pooling, and optionally a normalisation), as all-MiniLM-L6-v2 is, runs here with
transformers alone: importing sentence-transformers costs seconds on every start (it imports
scikit-learn and SciPy), more than a labeling job's embedding work. The vectors are
sentence-transformers' own up to float rounding (tests/test_embedding_judge.py). Any other model
(a hub id, other modules) is run by sentence-transformers itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
TOKENS_PER_BATCH = 4096  # padded tokens per forward pass


class SentenceEncoder(Protocol):
    device: Any

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """(len(texts), dim) float32 vectors of unit length."""
        ...


def load_sentence_encoder(path: str, device: str) -> SentenceEncoder:
    """The encoder of a sentence-transformers model folder or hub id (see the module doc)."""
    plain = _plain_layout(Path(path))
    if plain is not None:
        return _PlainEncoder(path, device, *plain)
    return _SentenceTransformersEncoder(path, device)


def _plain_layout(folder: Path) -> tuple[str, int | None] | None:
    """(pooling mode, max tokens) of a folder this module runs itself, else None."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"] for m in modules]
        if kinds[:2] != [_TRANSFORMER, _POOLING] or kinds[2:] not in ([], [_NORMALIZE]) or modules[0]["path"]:
            return None
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
        settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modes = [m for m in _POOLING_MODES if pooling.get(m)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v and k not in _POOLING_MODES]
    if len(modes) != 1 or others or settings.get("do_lower_case") or not pooling.get("include_prompt", True):
        return None
    return modes[0], settings.get("max_seq_length")


class _PlainEncoder:
    def __init__(self, path: str, device: str, mode: str, max_tokens: int | None) -> None:
        import torch  # why: torch stays out of start-up until a judge embeds
        from transformers import AutoModel, AutoTokenizer  # why: as above

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.mode = mode
        limits = [max_tokens, getattr(self.tokenizer, "model_max_length", None)]
        self.max_tokens = min((x for x in limits if isinstance(x, int) and 0 < x < 10**9), default=512)

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch  # why: as in __init__

        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for batch in _batches(ids, batch_size):
                inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
                inputs = inputs.to(self.device)
                tokens = self.model(**inputs).last_hidden_state
                mask = inputs["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                if self.mode == "pooling_mode_mean_tokens":
                    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                elif self.mode == "pooling_mode_cls_token":
                    pooled = tokens[:, 0]
                else:  # max over the real tokens
                    pooled = tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).max(1).values
                vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out[batch] = vectors.cpu().numpy()
        return out


def _batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `ids` in batches of similar lengths, longest first: at most `batch_size` texts,
    and at most TOKENS_PER_BATCH tokens once padded, so a few long texts do not make a whole
    batch of short ones run at their length."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches: list[list[int]] = []
    for i in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and (len(batches[-1]) + 1) * len(ids[batches[-1][0]]) <= TOKENS_PER_BATCH
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class _SentenceTransformersEncoder:
    def __init__(self, path: str, device: str) -> None:
        from sentence_transformers import (
            SentenceTransformer,  # why: seconds to import; only this model needs it
        )

        self.model = SentenceTransformer(path, device=device)
        self.device = self.model.device

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(vectors, dtype=np.float32)
