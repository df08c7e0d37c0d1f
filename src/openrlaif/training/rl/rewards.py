"""Rewards for RL: where they come from (`make_reward_fn`: a trained reward model, the judge's
direct score, or each sample's pairwise win rate against the other samples of its prompt), their
standardisation over the batch (`normalize_rewards`), and the KL-shaped per-token reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from openrlaif.data.records import Pair, Prompt
from openrlaif.judges import JudgmentCache, build_judge, load_judge_config
from openrlaif.judges.base import Comparison
from openrlaif.training.reward import RewardModel
from openrlaif.training.rl.config import RLBaseConfig

# (prompts, texts, ids, anchors or None) -> rewards (and the pairwise comparisons behind them)
RewardFn = Callable[[list[Prompt], list[str], list[list[int]], list[str] | None], "PairwiseRewards"]


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


def group_pairs(k: int, comparisons: str, rounds: int = 1) -> list[tuple[int, int]]:
    """Which samples of a group of k meet (each unordered pair once): `all_pairs` every pair,
    `round_robin` each sample with the next `rounds` samples (cyclically)."""
    if comparisons == "all_pairs":
        return [(i, j) for i in range(k) for j in range(i + 1, k)]
    pairs = {tuple(sorted((i, (i + d) % k))) for i in range(k) for d in range(1, min(rounds, k - 1) + 1)}
    return sorted((a, b) for a, b in pairs)


@dataclass
class PairwiseRewards:
    """Each sample's reward (its mean P(win) over its comparisons) and the judge's comparisons
    behind them (both orders each, for the judge diagnostics)."""

    scores: list[float]
    comparisons: list[Comparison]


def pairwise_rewards(
    judge: Any, prompts: Sequence[Prompt], texts: Sequence[str], k: int, comparisons: str = "all_pairs",
    rounds: int = 1, anchors: Sequence[str] | None = None,
) -> PairwiseRewards:  # fmt: skip
    """Group rewards from a pairwise judge (samples prompt-major, k per prompt). `anchor`: each
    sample against its prompt's anchor response (`anchors`, one per sample), P(sample wins): 2k
    ordered judgments per prompt instead of all pairs' k(k-1). Otherwise the pairs of
    `group_pairs`, each sample's mean P(win) over the pairs it is in. All of a step's comparisons
    go to the judge in one `compare_many` call (its forward passes batched, its cache used)."""
    if comparisons == "anchor":
        if anchors is None or len(anchors) != len(texts):
            raise ValueError("comparisons: anchor needs one anchor response per sample")
        got = judge.compare_many(list(zip(prompts, texts, anchors, strict=True)))
        return PairwiseRewards([c.p_a for c in got], got)
    pairs, index = [], []
    for g in range(len(texts) // k):
        for i, j in group_pairs(k, comparisons, rounds):
            pairs.append((prompts[g * k], texts[g * k + i], texts[g * k + j]))
            index.append((g * k + i, g * k + j))
    wins, met = [0.0] * len(texts), [0] * len(texts)
    got = judge.compare_many(pairs)
    for (a, b), c in zip(index, got, strict=True):
        wins[a] += c.p_a
        wins[b] += 1.0 - c.p_a
        met[a] += 1
        met[b] += 1
    return PairwiseRewards([w / max(m, 1) for w, m in zip(wins, met, strict=True)], got)


def pairwise_win_rates(judge: Any, prompts: Sequence[Prompt], texts: Sequence[str], k: int) -> list[float]:
    """Each sample's mean P(win) against the other k-1 samples of its prompt (prompt-major)."""
    return pairwise_rewards(judge, prompts, texts, k).scores


@dataclass
class Rewarder:
    """The reward source, as RL uses it: `reward(prompts, texts, ids, anchors)` one reward per
    response (and the pairwise comparisons behind them); `prefers(pairs)` its P(A preferred) on
    pairs of responses (for `judge/gold_agreement`): the judge's soft label, or for a reward model
    σ(r_A - r_B)."""

    reward: RewardFn
    prefers: Callable[[list[Pair]], list[float]]
    # (prompts, one response each, each prompt's K samples, anchors or None) -> the responses'
    # rewards on the samples' scale (the canaries of guards.py): a score, or with judge_pairwise
    # the mean P(win) against the K samples (anchor: against the anchor)
    score_alone: Callable[[list[Prompt], list[str], list[list[str]], list[str] | None], list[float]]
    runs_on: list[str] = field(default_factory=list)  # where its models run, one line each (for the log)


def make_rewarder(config: RLBaseConfig, tokenizer: Any, device: torch.device, judge: Any = None) -> Rewarder:
    """The configured reward source. `anchors`: one anchor response per sample for
    `comparisons: anchor`. `judge`, when given, replaces the configured one (programmatic use and
    tests)."""
    source = config.reward
    if source.type == "reward_model":
        # scoring batches padded as the trainers pad theirs
        rm = RewardModel.from_pretrained(
            source.path or "", device=device, pad_multiple=config.pad_to_multiple_of, dtype=source.dtype
        )

        def rm_prefers(pairs: list[Pair]) -> list[float]:
            prompts = [p.prompt for p in pairs]
            a = rm.score(prompts, [p.response_a for p in pairs], source.batch_size)
            b = rm.score(prompts, [p.response_b for p in pairs], source.batch_size)
            return torch.sigmoid(a - b).tolist()

        return Rewarder(
            lambda prompts, texts, ids, anchors: PairwiseRewards(
                rm.score_generations(prompts, ids, tokenizer, source.batch_size).tolist(), []
            ),
            rm_prefers,
            lambda prompts, texts, groups, anchors: rm.score(prompts, texts, source.batch_size).tolist(),
            [f"reward model {source.path}: {rm.precision.line()}"],
        )
    if judge is None:
        cache = JudgmentCache(source.cache) if source.cache else None
        judge = build_judge(load_judge_config(source.judge or ""), cache)

    # a judge given programmatically may be any object with the judge's methods it is asked for
    runs_on = judge.runs_on() if hasattr(judge, "runs_on") else []

    def judge_prefers(pairs: list[Pair]) -> list[float]:
        return [c.p_a for c in judge.compare_many([(p.prompt, p.response_a, p.response_b) for p in pairs])]

    def judge_scores(prompts: list[Prompt], texts: list[str], *_: Any) -> list[float]:
        return [s.score for s in judge.score_many(list(zip(prompts, texts, strict=True)))]

    if source.type == "judge_score":
        return Rewarder(
            lambda prompts, texts, ids, anchors: PairwiseRewards(judge_scores(prompts, texts), []),
            judge_prefers,
            judge_scores,
            runs_on,
        )

    def against_samples(
        prompts: list[Prompt], texts: list[str], groups: list[list[str]], anchors: list[str] | None
    ) -> list[float]:
        if anchors is not None:  # anchor mode: as a sample is rewarded, P(it beats the anchor)
            return pairwise_rewards(judge, prompts, texts, 1, "anchor", anchors=anchors).scores
        pairs = [(p, t, other) for p, t, group in zip(prompts, texts, groups, strict=True) for other in group]
        wins = [c.p_a for c in judge.compare_many(pairs)]
        k = len(groups[0]) if groups else 1
        return [sum(wins[i * k : (i + 1) * k]) / k for i in range(len(texts))]

    return Rewarder(
        lambda prompts, texts, ids, anchors: pairwise_rewards(
            judge, prompts, texts, config.num_samples, source.comparisons, source.rounds, anchors
        ),
        judge_prefers,
        against_samples,
        runs_on,
    )
