"""Rewards for RL: where they come from (`make_reward_fn`: a trained reward model, the judge's
direct score, or each sample's pairwise win rate against the other samples of its prompt), their
standardisation over the batch (`normalize_rewards`), and the KL-shaped per-token reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from openrlaif.judges import build_judge, load_judge_config
from openrlaif.training.reward import RewardModel
from openrlaif.training.rl.config import RLBaseConfig

RewardFn = Callable[[list[str], list[str], list[list[int]]], list[float]]  # prompts, texts, ids -> r


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -β·kl_t at every response token, plus (1-β)·score at the last one (reward only on
    the final token; the KL penalty folded in per token)."""
    rewards = -beta * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1)  # the last response token (responses start after the prompt)
    rewards[torch.arange(len(scores)), last] += (1.0 - beta) * scores
    return rewards


def standardized(scores: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """(r - mean) / std over the rewards of every process's batch (`normalize_rewards`)."""
    stats = accelerator.reduce(torch.stack([scores.sum(), (scores**2).sum(), torch.tensor(float(len(scores)),
                               device=scores.device)]).double(), "sum")  # fmt: skip
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean**2).clamp(min=0.0)
    return ((scores - mean) * torch.rsqrt(var + 1e-8)).float()


def pairwise_win_rates(judge: Any, prompts: Sequence[str], texts: Sequence[str], k: int) -> list[float]:
    """Each sample's mean P(win) against the other k-1 samples of its prompt (prompt-major)."""
    pairs, index = [], []
    for g in range(len(texts) // k):
        for i in range(k):
            for j in range(i + 1, k):
                pairs.append((prompts[g * k], texts[g * k + i], texts[g * k + j]))
                index.append((g * k + i, g * k + j))
    wins = [0.0] * len(texts)
    for (a, b), c in zip(index, judge.compare_many(pairs), strict=True):
        wins[a] += c.p_a
        wins[b] += 1.0 - c.p_a
    return [w / (k - 1) for w in wins]


def make_reward_fn(config: RLBaseConfig, tokenizer: Any, device: torch.device, judge: Any = None) -> RewardFn:
    """(prompts, response texts, response ids) -> one reward per response. `judge`, when given,
    replaces the configured one (programmatic use and tests)."""
    source = config.reward
    if source.type == "reward_model":
        # scoring batches padded as the trainers pad theirs
        rm = RewardModel.from_pretrained(
            source.path or "", device=device, pad_multiple=config.pad_to_multiple_of
        )
        return lambda prompts, texts, ids: rm.score_generations(
            prompts, ids, tokenizer, source.batch_size
        ).tolist()
    if judge is None:
        judge = build_judge(load_judge_config(source.judge or ""))
    if source.type == "judge_score":
        return lambda prompts, texts, ids: [
            s.score for s in judge.score_many(list(zip(prompts, texts, strict=True)))
        ]
    return lambda prompts, texts, ids: pairwise_win_rates(judge, prompts, texts, config.num_samples)
