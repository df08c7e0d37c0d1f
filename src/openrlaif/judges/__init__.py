"""Judges: one protocol (`Judge`), four backends, described by YAML configs.

judge = build_judge(load_judge_config("embedding-harmless"), cache=JudgmentCache(path))
judge.compare(prompt, a, b).p_a      # P(a preferred), both orders averaged
judge.score(prompt, response)        # d-RLAIF score in [-1, 1]
"""

from __future__ import annotations

from openrlaif.config import (
    EmbeddingJudgeConfig,
    EnsembleJudgeConfig,
    HFJudgeConfig,
    JudgeConfig,
    OpenAIJudgeConfig,
    load_judge_config,
)
from openrlaif.judges.base import Comparison, Judge, OrderedPair, OrderJudgment, ScoreJudgment
from openrlaif.judges.cache import JudgmentCache
from openrlaif.judges.embedding import EmbeddingJudge
from openrlaif.judges.ensemble import EnsembleJudge
from openrlaif.judges.openai_compat import OpenAIJudge


def build_judge(config: JudgeConfig, cache: JudgmentCache | None = None) -> Judge:
    """Instantiate the backend a config names; backends are imported only when used."""
    judge: Judge
    if isinstance(config, HFJudgeConfig):
        from openrlaif.judges.hf import HFJudge  # why: start-up — it imports torch

        judge = HFJudge(config)
    elif isinstance(config, OpenAIJudgeConfig):
        judge = OpenAIJudge(config)
    elif isinstance(config, EmbeddingJudgeConfig):
        judge = EmbeddingJudge(config)
    elif isinstance(config, EnsembleJudgeConfig):
        members = [build_judge(c, cache) for c in config.judges if not isinstance(c, str)]
        judge = EnsembleJudge(config, members)
    else:  # pragma: no cover - the config union is closed
        raise TypeError(f"unknown judge config {type(config).__name__}")
    judge.cache = cache
    return judge


__all__ = [
    "Comparison",
    "Judge",
    "JudgmentCache",
    "OrderJudgment",
    "OrderedPair",
    "ScoreJudgment",
    "build_judge",
    "load_judge_config",
]
