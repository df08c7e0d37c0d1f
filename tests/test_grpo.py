"""GRPO and its variants (training/rl/grpo.py): each setting against hand-computed values, one
update's exact parameter change on a toy rollout, and short runs of the real trainer."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from openrlaif.training.rl import GRPOConfig, RLConfig, train_rl
from openrlaif.training.rl.grpo import aggregate, clipped_surrogate, group_advantages, k3_kl, update
from openrlaif.training.rl.rollout import Rollout
from openrlaif.training.rl.updater import Updater

sys.path.insert(0, str(Path(__file__).parent))
from test_training_rl import VowelJudge, metric_rows, rl_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_scale_by_the_group_the_batch_or_nothing() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])  # two prompts, K = 4
    # group 1: mean 3, Bessel std sqrt((4 + 1 + 0 + 9) / 3); group 2: mean 1, std sqrt((1 + 1 + 1 + 9) / 3) = 2
    std1 = math.sqrt(14 / 3)
    expected_group = [-2 / (std1 + 1e-4), -1 / (std1 + 1e-4), 0.0, 3 / (std1 + 1e-4)] + [
        -1 / (2 + 1e-4), -1 / (2 + 1e-4), -1 / (2 + 1e-4), 3 / (2 + 1e-4)
    ]  # fmt: skip
    assert group_advantages(returns, 4, "group").tolist() == pytest.approx(expected_group, rel=1e-6)
    centred = [-2.0, -1.0, 0.0, 3.0, -1.0, -1.0, -1.0, 3.0]
    assert group_advantages(returns, 4, "none").tolist() == pytest.approx(centred)  # Dr. GRPO
    batch_std = float(returns.std())  # over all 8 returns: mean 2, Bessel
    assert batch_std == pytest.approx(math.sqrt((1 + 0 + 1 + 16 + 4 + 4 + 4 + 4) / 7))
    assert group_advantages(returns, 4, "batch").tolist() == pytest.approx(
        [c / (batch_std + 1e-4) for c in centred], rel=1e-6
    )
    assert group_advantages(torch.full((4,), 0.7), 4, "group").tolist() == [0.0] * 4  # a tie: 0, not NaN


def test_clipped_surrogate_with_clip_higher() -> None:
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))  # ratios
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, advantages, low=0.2, high=0.28)
    # A > 0, ρ 1.5: min(1.5, 1.28)·1 -> -1.28 (clipped at 1 + 0.28, not 1.2)
    # A < 0, ρ 1.5: min(-1.5, -1.28) -> 1.5 (the unclipped, pessimistic side)
    # A < 0, ρ 0.5: min(-0.5, -0.8) -> 0.8 (clipped at 1 - 0.2); A > 0, ρ 1.1: inside -> -1.1
    assert loss.tolist() == pytest.approx([-1.28, 1.5, 0.8, -1.1], rel=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0]
    symmetric, _ = clipped_surrogate(logp, old, advantages, low=0.2, high=0.2)
    assert symmetric[0].item() == pytest.approx(-1.2)


def test_k3_is_the_positive_kl_estimator() -> None:
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    # exp(ref - logp) - (ref - logp) - 1: 0.5 - log 0.5 - 1 = 0.19315; equal log-probs: 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0], abs=1e-6)


def test_aggregation_per_sequence_and_per_token() -> None:
    per_token = torch.tensor([[1.0, 3.0, 9.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    tokens = mask.sum()
    assert aggregate(per_token, mask, "sequence", 2, tokens).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "token", 2, tokens).item() == pytest.approx((1 + 3 + 4) / 3)
    # micro-batch shares add up to the whole batch's loss
    for how in ("sequence", "token"):
        parts = aggregate(per_token[:1], mask[:1], how, 2, tokens) + aggregate(
            per_token[1:], mask[1:], how, 2, tokens
        )
        assert parts.item() == pytest.approx(aggregate(per_token, mask, how, 2, tokens).item())


class _ToyPolicy(torch.nn.Module):
    """The log-probs of a rollout's tokens are themselves the parameters: gradients by hand."""

    def __init__(self, logp: torch.Tensor) -> None:
        super().__init__()
        self.logp = torch.nn.Parameter(logp.clone())


def _toy_update(config: GRPOConfig, old: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    from accelerate import Accelerator

    from openrlaif.training.rl.rewards import shaped_rewards

    policy = _ToyPolicy(old)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    kl = (old - ref) * mask
    rollout = Rollout(
        seqs=type("Seqs", (), {"mask": mask})(), scores=scores, rewards=shaped_rewards(scores, kl, mask, config.beta),
        seq_kl=kl.sum(-1), ref_logp=ref, old_logp=old, old_values=None, micro_batches=[slice(0, len(scores))],
        num_samples=config.num_samples, forward=lambda rows: (policy.logp[rows], torch.zeros_like(mask[rows]), None),
        step=1, last_checkpoint=None,
    )  # fmt: skip
    update(config, Updater(accelerator, optimizer, [policy], None, False), rollout)
    return policy.logp.detach() - old  # = -gradient (SGD, lr 1)


def _settings(**overrides: Any) -> GRPOConfig:
    base = dict(algorithm="grpo", model="m", data="d", output_dir="o", reward={"type": "judge_score", "judge": "j"},
                num_samples=2, batch_size=1, beta=0.0, max_grad_norm=None)  # fmt: skip
    config = RLConfig(**(base | overrides))
    assert isinstance(config, GRPOConfig)
    return config


def test_one_update_moves_each_token_by_its_hand_computed_gradient() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # sample 0: 3 tokens; sample 1: 1 token
    old = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 1.0, 1.0]]))
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.3], [0.2, 1.0, 1.0]]))
    scores = torch.tensor([1.0, 0.0])  # group of 2: mean 0.5; A = ±0.5 / (std + 1e-4), std = sqrt(0.5)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)

    # GRPO: ratio 1 at the first step, loss mean_i mean_t(-A_i ρ_t): d/dlogp_it = -A_i / (len_i · 2)
    moved = _toy_update(_settings(), old, ref, scores, mask)
    assert moved[0].tolist() == pytest.approx([a / 6] * 3, rel=1e-5)
    assert moved[1, 0].item() == pytest.approx(-a / 2, rel=1e-5) and moved[1, 1:].abs().max() == 0
    # per token (DAPO): mean over the 4 tokens: -A_i / 4 each
    moved = _toy_update(_settings(loss_aggregation="token"), old, ref, scores, mask)
    assert moved[0].tolist() == pytest.approx([a / 4] * 3, rel=1e-5) and moved[1, 0].item() == pytest.approx(
        -a / 4
    )
    # Dr. GRPO (no std): A = ±0.5
    moved = _toy_update(_settings(scale_rewards="none"), old, ref, scores, mask)
    assert moved[0, 0].item() == pytest.approx(0.5 / 6, rel=1e-5)
    # the k3 KL as a loss term adds β·(1 - exp(ref - logp)) / (len_i · 2) to d/dlogp: token 0 of sample 0 only
    moved = _toy_update(_settings(kl_in="loss", beta=0.1), old, ref, scores, mask)
    expected = a / 6 - 0.1 * (1 - 0.5) / 6
    assert moved[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert moved[0, 1].item() == pytest.approx(a / 6, rel=1e-5)
    # the KL in the reward (the paper's): R_i = (1-β)·score_i - β·KL_i; β 0.1, KL_0 = log 2, KL_1 = 0
    moved = _toy_update(_settings(beta=0.1), old, ref, scores, mask)
    r0, r1 = 0.9 - 0.1 * math.log(2), 0.0
    a_kl = (r0 - r1) / 2 / (abs(r0 - r1) / math.sqrt(2) + 1e-4)
    assert moved[0, 0].item() == pytest.approx(a_kl / 6, rel=1e-5)


def test_several_iterations_clip_the_ratio() -> None:
    """With μ = 3 passes of one minibatch, the second and third passes see ρ ≠ 1 and stop moving a
    token whose ratio left [1 - ε, 1 + ε_high] in the advantage's direction."""
    mask = torch.ones(2, 1)
    old = torch.log(torch.tensor([[0.5], [0.5]]))
    moved = _toy_update(_settings(num_iterations=3, num_minibatches=1, clip_range=0.2, clip_range_high=0.28,
                                  learning_rate=1.0), old, old, torch.tensor([1.0, 0.0]), mask)  # fmt: skip
    # SGD lr 1 with A ≈ ±0.707: the first pass moves log π by ±0.354, ρ = e^0.354 = 1.42 > 1.28 for the
    # positive sample (clipped: no more gradient), e^-0.354 = 0.70 < 0.8 for the negative one (clipped too)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert moved[:, 0].tolist() == pytest.approx([a / 2, -a / 2], rel=1e-5)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValidationError, match="num_samples >= 2"):
        _settings(num_samples=1)
    with pytest.raises(ValidationError, match="scale_rewards"):
        _settings(scale_rewards="sometimes")
    with pytest.raises(ValidationError, match="algorithm grpo"):  # GRPO's setting under another algorithm
        RLConfig(algorithm="rloo", model="m", data="d", output_dir="o",
                 reward={"type": "judge_score", "judge": "j"}, kl_in="loss")  # fmt: skip
    with pytest.raises(ValidationError, match="num_minibatches 8"):
        _settings(num_minibatches=8)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # GRPO as published: group std, per-sequence, KL in the reward, one step per rollout
        {"scale_rewards": "none", "loss_aggregation": "token", "kl_in": "loss", "clip_range_high": 0.28},
        {"num_iterations": 2, "num_minibatches": 2, "scale_rewards": "batch", "grad_accum_steps": 2},
    ],
    ids=["grpo", "dr-grpo-dapo", "two-iterations"],
)
def test_grpo_trains_the_tiny_policy_toward_the_reward(
    settings: dict[str, Any], tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    config = rl_config(tiny_gpt2, prompts, tmp_path / "grpo", algorithm="grpo", max_steps=12, **settings)
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    rows = metric_rows(tmp_path / "grpo")
    assert len(rows) == 12 and all(math.isfinite(r["train/loss"]) for r in rows)
    first, last = (sum(r["train/reward_mean"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first, (first, last)  # the vowel reward rises
    if settings.get("num_iterations", 1) > 1:
        assert any(r["train/clip_fraction"] > 0 for r in rows)  # later passes see ratios away from 1
    assert result.steps == 12
