"""RL (training/rl/): advantages, baselines, clipping and KL shaping against hand-computed
values; then learning evidence on CPU with a tiny random GPT-2 and a scripted judge.

The scripted reward: +1 when a response starts with a vowel, -1 otherwise. A random policy
starts near -0.5 (about a quarter of its tokens start with a vowel); each algorithm must raise
the mean reward within 16 steps while the KL to the reference stays below a stated bound.
Gradient accumulation must give the weights of one update of the whole rollout, resuming must be
exact, and rollouts through an OpenAI-compatible server (a real socket) must come from the
trainer's current policy, which the server reloads from disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from scripted_judge import ScriptedJudge
from training_toys import WORDS, sft_rows, untrained_reward_model

from openrlaif.errors import ConfigError, JudgeError
from openrlaif.judges.base import OrderedPair, OrderJudgment, ScoreJudgment
from openrlaif.training.checkpoint import weights_digest
from openrlaif.training.config import load_train_config, resolve_train_config_path
from openrlaif.training.errors import TrainingError
from openrlaif.training.rl import RLConfig, train_rl
from openrlaif.training.rl.losses import value_loss
from openrlaif.training.rl.online_dpo import best_worst_pairs
from openrlaif.training.rl.online_dpo import online_dpo_loss as dpo_loss
from openrlaif.training.rl.ppo import gae, ppo_policy_loss
from openrlaif.training.rl.reinforce import returns_to_go
from openrlaif.training.rl.rewards import pairwise_win_rates, shaped_rewards, standardized
from openrlaif.training.rl.rloo import rloo_advantages

# ---------------------------------------------------------------- hand-computed values


def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt() -> None:
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 2: -1.5, -1.5, 3
    expected = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert torch.allclose(rloo_advantages(returns, 3), expected)


def test_normalized_rewards_have_mean_0_and_std_1_over_every_process() -> None:
    class TwoProcesses:  # as if another process held the same rewards: sums double, moments stay
        def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
            return 2 * x

    scores = torch.tensor([0.01, 0.03, 0.02, 0.06])
    out = standardized(scores, TwoProcesses())
    mean, std = 0.03, math.sqrt(((scores - 0.03) ** 2).mean().item())  # population std
    assert torch.allclose(out, (scores - mean) / std, atol=1e-5), out
    assert torch.allclose(standardized(torch.full((4,), 0.5), TwoProcesses()), torch.zeros(4))  # no spread: 0


def test_kl_shaped_reward_puts_the_score_on_the_last_response_token_only() -> None:
    # two sequences over 5 positions; responses start after the prompt (mask 0 there)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float)
    kl = torch.tensor([[9.0, 0.2, -0.1, 0.4, 9.0], [9.0, 9.0, 0.0, 1.0, 2.0]])
    scores = torch.tensor([1.0, -0.5])
    rewards = shaped_rewards(scores, kl * mask, mask, beta=0.1)
    expected = torch.tensor([[0, -0.02, 0.01, -0.04 + 0.9, 0], [0, 0, 0, -0.1, -0.2 + 0.9 * -0.5]])
    assert torch.allclose(rewards, expected)
    # γ = 1: the return at the first response token is (1-β)·r - β·Σ kl, the objective
    returns = returns_to_go(rewards, mask)
    assert returns[0, 1].item() == pytest.approx(0.9 * 1.0 - 0.1 * 0.5)
    assert returns[1, 2].item() == pytest.approx(0.9 * -0.5 - 0.1 * 3.0)
    assert returns[0, 4].item() == 0.0 and returns[1, 0].item() == 0.0


def test_gae_on_a_small_hand_example() -> None:
    # one response of 3 tokens after a 1-token prompt; γ = 0.9, λ = 0.5
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, -0.1, 1.0]])
    values = torch.tensor([[5.0, 0.5, 0.4, 0.8]])
    # δ3 = 1 - 0.8 = 0.2; δ2 = -0.1 + 0.9·0.8 - 0.4 = 0.22; δ1 = 0 + 0.9·0.4 - 0.5 = -0.14
    # A3 = 0.2; A2 = 0.22 + 0.45·0.2 = 0.31; A1 = -0.14 + 0.45·0.31 = -0.0005
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.0, -0.0005, 0.31, 0.2]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.0, 0.4995, 0.71, 1.0]]), atol=1e-6)
    # λ = 1, γ = 1: GAE is the Monte Carlo return minus V (REINFORCE with a baseline)
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages[0, 1:], returns_to_go(rewards, mask)[0, 1:] - values[0, 1:])


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_loss", "clipped"),
    [
        (1.1, 2.0, -2.2, False),  # inside the range: -A·ρ
        (1.5, 2.0, -2.4, True),  # A > 0, ρ above 1+ε: the gain is capped at (1+ε)·A
        (0.5, 2.0, -1.0, False),  # A > 0, ρ below 1-ε: the unclipped (worse) term counts
        (0.5, -2.0, 1.6, True),  # A < 0, ρ below 1-ε: capped at (1-ε)·A
        (1.5, -2.0, 3.0, False),  # A < 0, ρ above 1+ε: the unclipped (worse) term counts
        (0.9, -2.0, 1.8, False),  # inside the range
    ],
)
def test_ppo_clipped_objective(ratio: float, advantage: float, expected_loss: float, clipped: bool) -> None:
    old = torch.tensor([[-1.0]])
    logp = old + math.log(ratio)
    loss, clip_fraction = ppo_policy_loss(logp, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert clip_fraction.item() == float(clipped)


def test_online_dpo_pairs_the_best_and_worst_sample_of_each_prompt() -> None:
    scores = torch.tensor([0.1, 0.9, -0.5, 0.3, 0.3, 0.3])  # k = 3; the second prompt all ties
    chosen, rejected, valid = best_worst_pairs(scores, 3)
    assert chosen[0].item() == 1 and rejected[0].item() == 2 and valid.tolist() == [1.0, 0.0]
    policy, ref = (
        torch.tensor([-1.0, -2.0, -3.0, 0.0, 0.0, 0.0]),
        torch.tensor([-1.5, -2.5, -2.0, 9.0, 9.0, 9.0]),
    )
    # Δ = (-2 + 2.5) - (-3 + 2) = 1.5; loss = -log σ(0.1·1.5), the tied prompt left out
    loss = dpo_loss(policy, ref, chosen, rejected, valid, beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))))


def test_value_loss_with_clipping_takes_the_worse_error() -> None:
    mask, returns, old = torch.ones(1, 2), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.5, 2.0]])
    # unclipped: 0.25, 1.0; clipped to old ± 0.2: (0.2-1)² = 0.64, (0.2-1)² = 0.64 -> max 0.64, 1.0
    assert value_loss(values, old, returns, mask, None).item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    assert value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_pairwise_reward_is_each_samples_win_rate_against_the_others_of_its_prompt() -> None:
    judge = ScriptedJudge(keyword="x", k=1.0)  # P(first wins) = σ(count difference)
    texts = ["x x", "x", "", "x", "x"]  # k = 3 for prompt p, k = ... (two groups below)
    win = pairwise_win_rates(judge, ["p"] * 3 + ["q"] * 3, [*texts[:3], "x", "x", "x"], 3)
    s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    assert win[:3] == pytest.approx([(s1 + s2) / 2, ((1 - s1) + s1) / 2, ((1 - s2) + (1 - s1)) / 2])
    assert win[3:] == pytest.approx([0.5, 0.5, 0.5])  # equal responses: a coin flip each


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_shared_prompt_training_pass_gives_the_gradients_of_the_full_pass(
    arch: str, request: pytest.FixtureRequest
) -> None:
    """Each prompt encoded once for its K samples, with gradients on: the same log-probs and the
    same parameter gradients as one full pass over every row (float rounding apart)."""
    from transformers import AutoModelForCausalLM

    from openrlaif.inference.local import sample
    from openrlaif.models.loading import load_pretrained, load_tokenizer
    from openrlaif.training.rl.rollout import build_sequences, response_logprobs

    path = str(request.getfixturevalue(arch))
    tokenizer = load_tokenizer(path)
    model = load_pretrained(AutoModelForCausalLM, path).eval()
    texts = [r["prompt"] for r in sft_rows(3, seed=5)] + ["Human: Hi\n\nAssistant:"]  # unequal lengths
    seqs = build_sequences(sample(model, tokenizer, texts, n=3, max_new_tokens=6, seed=1), tokenizer.pad_token_id,
                           torch.device("cpu"))  # fmt: skip
    weights = torch.randn(seqs.mask.shape, generator=torch.Generator().manual_seed(0))
    logps, grads = {}, {}
    for share in (False, True):
        model.zero_grad()
        logp, _ = response_logprobs(model, seqs, share_prompts=share)
        (logp * weights * seqs.mask).sum().backward()
        logps[share] = logp.detach()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(logps[True], logps[False], atol=1e-5), (logps[True] - logps[False]).abs().max()
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, full in grads[False].items():
        diff, scale = (grads[True][name] - full).abs().max().item(), full.abs().max().item()
        assert diff <= 1e-5 * scale + 1e-8, (name, diff, scale)  # summation order apart


def test_fused_gelu_computes_gpt2s_activation(tiny_gpt2: Path) -> None:
    """`fused_activations` swaps GPT-2's gelu_new for the fused tanh-GELU: the same function."""
    from transformers import AutoModelForCausalLM

    from openrlaif.training.rl.rollout import fuse_activations

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_activations(model) == model.config.n_layer
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert fuse_activations(model) == 0  # nothing left to swap


# ---------------------------------------------------------------- training on CPU


def starts_with_vowel(text: str) -> bool:
    return text[:1].lower() in "aeiou"


class VowelJudge(ScriptedJudge):
    """Scripted d-RLAIF scorer (+1 for a response starting with a vowel, -1 otherwise) and a
    pairwise judge preferring such responses; `fail_at_call` raises (an interruption)."""

    def __init__(self, nan: bool = False, fail_at_call: int | None = None) -> None:
        super().__init__(keyword="vowel")
        self.nan, self.fail_at_call, self.calls = nan, fail_at_call, 0

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise KeyboardInterrupt("interrupted")
        if self.nan:
            return [ScoreJudgment(score=math.nan) for _ in items]
        return [ScoreJudgment(score=1.0 if starts_with_vowel(r) else -1.0) for _, r in items]

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        diff = [starts_with_vowel(i.first) - starts_with_vowel(i.second) for i in items]
        return [OrderJudgment(p_first=1 / (1 + math.exp(-3.0 * d))) for d in diff]


pytestmark = pytest.mark.usefixtures("one_thread")


def rl_config(model: Path, data: Path, out: Path, **overrides: Any) -> RLConfig:
    settings: dict[str, Any] = dict(
        model=str(model), data=str(data), output_dir=str(out), reward={"type": "judge_score", "judge": "scripted"},
        num_samples=4, batch_size=8, max_new_tokens=3, learning_rate=1e-2, lr_schedule="constant",
        whiten_advantages=True, max_steps=16, save_every=100, mixed_precision="no", tensorboard=False,
    )  # fmt: skip
    return RLConfig(**(settings | overrides))


def metric_rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


KL_BOUND = 12.0  # nats per response (3 tokens) after 16 steps
# online DPO gets one pair per prompt (none where all K samples tie), so it learns slower at 1e-2;
# PPO takes 4 optimizer steps per RL step (2 epochs x 2 minibatches), so it moves faster
SETTINGS: dict[str, dict[str, Any]] = {
    "online_dpo": {"learning_rate": 3e-2, "dpo_beta": 0.5},
    "ppo": {"learning_rate": 5e-3},
}


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "ppo", "online_dpo"])
def test_each_algorithm_raises_the_d_rlaif_score_with_bounded_kl(
    algorithm: str, tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / algorithm
    config = rl_config(tiny_gpt2, prompts, out, algorithm=algorithm, **SETTINGS.get(algorithm, {}))
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    before = sum(r["train/reward_mean"] for r in rows[:4]) / 4
    after = sum(r["train/reward_mean"] for r in rows[-4:]) / 4
    print(f"{algorithm}: reward {before:.3f} -> {after:.3f}, max KL {max(r['train/kl'] for r in rows):.2f}")
    assert after > before + 0.4, (before, after)
    assert max(r["train/kl"] for r in rows) < KL_BOUND
    for key in ("reward_std", "kl", "entropy", "response_length", "loss", "policy_loss", "learning_rate",
                "samples_per_s", "tokens_per_s", "objective"):  # fmt: skip
        assert all(math.isfinite(r[f"train/{key}"]) for r in rows), key
    assert rows[0]["train/response_length"] <= 3
    assert (result.model_dir / "model.safetensors").exists()
    if algorithm in ("reinforce", "ppo"):
        assert (out / "value" / "value_head.safetensors").exists()


def test_pairwise_judge_reward_raises_the_rate_the_judge_prefers(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    from openrlaif.inference.local import sample
    from openrlaif.models.loading import load_pretrained, load_tokenizer

    config = rl_config(tiny_gpt2, prompts, tmp_path / "pairwise", algorithm="rloo",
                       reward={"type": "judge_pairwise", "judge": "scripted"})  # fmt: skip
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    rows = metric_rows(tmp_path / "pairwise")
    assert all(r["train/reward_mean"] == pytest.approx(0.5) for r in rows)  # win rates of a group average 1/2

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_gpt2))
    texts = [r["prompt"] for r in sft_rows(16, seed=7)]
    rate = {}
    for name, model in (("sft", load_pretrained(AutoModelForCausalLM, str(tiny_gpt2))), ("rl", result.model)):
        out = sample(model, tokenizer, texts, n=4, max_new_tokens=3, seed=123)
        rate[name] = sum(starts_with_vowel(s.response_text) for s in out) / len(out)
    print(f"pairwise: vowel-start rate {rate['sft']:.3f} -> {rate['rl']:.3f}")
    assert rate["rl"] > rate["sft"] + 0.2, rate


def test_rl_raises_the_reward_and_the_judged_win_rate_on_held_out_prompts(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    """The machinery learns, independent of the quickstart's judge: against a judge that clearly
    prefers one kind of response, RL raises the reward, and `openrlaif eval`'s win rate of the
    RL policy over its starting point, on prompts RL never saw, has its 95% CI above 50%."""
    from openrlaif.data.records import PromptRecord
    from openrlaif.evaluation.evaluate import EvalSettings, evaluate

    out = tmp_path / "learn"
    config = rl_config(tiny_gpt2, prompts, out, algorithm="rloo", max_steps=24)
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    rows = metric_rows(out)
    before = sum(r["train/reward_mean"] for r in rows[:4]) / 4
    after = sum(r["train/reward_mean"] for r in rows[-4:]) / 4
    assert after > before + 0.4, (before, after)

    held_out = [PromptRecord(f"held-{i}", f"Human: Say something about {w}.\n\nAssistant:")
                for i, w in enumerate(WORDS)]  # fmt: skip
    assert not {p.prompt for p in held_out} & {r["prompt"] for r in sft_rows(64)}  # RL never saw them
    summary = evaluate(
        result.model_dir, tiny_gpt2, held_out, VowelJudge(), tmp_path / "eval", name_a="rl", name_b="init",
        settings=EvalSettings(max_new_tokens=3, bootstrap_resamples=500), show_progress=False,
    )  # fmt: skip
    win = summary["win_rate"]
    print(f"rule reward {before:.3f} -> {after:.3f}; judged win rate {win['value']:.3f} {win['ci95']}")
    assert win["ci95"][0] > 0.5, win


def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    # PPO with its value model, two minibatches of 4 sequences, each accumulated over 2 micro-batches
    # no canaries: the judge counts its calls to know when to interrupt
    settings = dict(algorithm="ppo", max_steps=4, save_every=2, batch_size=2, warmup_ratio=0.5,
                    lr_schedule="linear", grad_accum_steps=2, canary_every=0)  # fmt: skip
    full = train_rl(rl_config(tiny_gpt2, prompts, tmp_path / "full", **settings), show_progress=False,
                    judge=VowelJudge())  # fmt: skip
    config = rl_config(tiny_gpt2, prompts, tmp_path / "cut", **settings)
    with pytest.raises(KeyboardInterrupt):  # dies while rewarding step 3, after step 2's checkpoint
        train_rl(config, show_progress=False, judge=VowelJudge(fail_at_call=3))
    with pytest.raises(ConfigError, match="--resume"):
        train_rl(config, show_progress=False, judge=VowelJudge())
    resumed = train_rl(config, resume=True, show_progress=False, judge=VowelJudge())
    assert weights_digest(resumed.model) == weights_digest(full.model)
    value = (tmp_path / "full" / "value" / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "value" / "model.safetensors").read_bytes() == value
    assert [r["step"] for r in metric_rows(tmp_path / "cut")] == [1, 2, 3, 4]


@pytest.mark.parametrize("algorithm", ["reinforce", "online_dpo", "ppo"])
def test_gradient_accumulation_gives_the_weights_of_one_update_of_the_whole_rollout(
    algorithm: str, tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    """grad_accum_steps splits each step's rollout into micro-batches (of whole prompts; PPO: of each
    minibatch), whose losses are shares of the batch's: the gradient, and so the weights, are those
    of one update of the whole batch. The same seed gives the same first rollout; the second step
    samples from weights equal to float rounding, so its samples agree too. Uneven splits (3
    prompts in 2 micro-batches) and a loss normalised over tokens (REINFORCE, PPO), over pairs
    (online DPO) and the value model are all covered; REINFORCE at 1 micro-batch takes the old
    log-probs from its training forward, at 2 from a separate pass."""
    from transformers import AutoModelForCausalLM

    settings = dict(algorithm=algorithm, max_steps=2, batch_size=3, save_every=100, learning_rate=1e-3,
                    whiten_advantages=algorithm != "ppo", num_minibatches=2)  # fmt: skip
    weights, logs = {}, {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        result = train_rl(rl_config(tiny_gpt2, prompts, out, grad_accum_steps=accum, **settings),
                          show_progress=False, judge=VowelJudge())  # fmt: skip
        weights[accum] = {name: t.detach().clone() for name, t in result.model.state_dict().items()}
        logs[accum] = metric_rows(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_gpt2).state_dict()
    # what training moved, and how far apart the two runs ended: float rounding only
    moved = torch.cat([(weights[1][name] - t).flatten() for name, t in initial.items()]).norm()
    apart = torch.cat([(weights[2][name] - weights[1][name]).flatten() for name in initial]).norm()
    print(f"{algorithm}: |w - w0| {moved:.3g}, |w(accum 2) - w(accum 1)| {apart:.3g}")
    assert moved > 1e-2 and apart < 1e-4 * moved, (moved, apart)
    for row1, row2 in zip(logs[1], logs[2], strict=True):  # the same samples and the same losses
        for key in ("train/reward_mean", "train/kl", "train/response_length", "train/loss", "train/entropy",
                    "train/grad_norm"):  # fmt: skip
            assert row2[key] == pytest.approx(row1[key], rel=1e-4, abs=1e-6), key


def test_rollouts_through_a_server_that_reloads_the_policy(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    """RL sampling through an OpenAI-compatible server over a real socket (tests/openai_server.py,
    serving the tiny GPT-2 from its own copy of the weights). Before the first step, then every
    `sync_every` steps, the trainer saves the policy and the server reloads it (SGLang's
    /update_weights_from_disk); the server answers with the sampled token ids and their log-probs.
    With sync_every 1 the server's weights at each step are the policy that step starts from (the
    previous step's checkpoint) and its log-probs of what it sampled equal the trainer's
    (rollout_logp_gap ~ 0); with sync_every 2, step 2 samples from step 0's policy, and the gap
    shows it."""
    from openai_server import LocalLM, OpenAITestServer
    from transformers import AutoModelForCausalLM

    from openrlaif.errors import GenerationError

    initial = weights_digest(AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    with OpenAITestServer(LocalLM(tiny_gpt2, name="policy")) as server:
        for every in (1, 2):
            server.reset()
            server.reloads.clear()
            out = tmp_path / f"every{every}"
            config = rl_config(tiny_gpt2, prompts, out, algorithm="rloo", max_steps=3, batch_size=2, save_every=1,
                               keep_checkpoints=3, rollout_server={"model": "policy", "base_urls": [server.url],
                                                                   "api_key_env": None, "sync_every": every})  # fmt: skip
            result = train_rl(config, show_progress=False, judge=VowelJudge())
            policies = [initial] + [
                weights_digest(
                    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / f"step-{s:08d}" / "model")
                )
                for s in (1, 2)
            ]  # the policy each step starts from
            synced = [1, 2, 3] if every == 1 else [1, 3]
            assert [digest for _, digest in server.reloads] == [policies[s - 1] for s in synced]
            assert [Path(path).name for path, _ in server.reloads] == [f"step-{s - 1:08d}" for s in synced]
            assert sorted(p.name for p in (out / "rollout_policy").iterdir()) == [
                f"step-{synced[-1] - 1:08d}"
            ]
            completions = [r for r in server.posts() if r.path == "/v1/completions"]
            assert len(completions) == 3 * 2 * 4  # steps x prompts x K, each with its own seed, token ids in
            assert all(isinstance(r.body["prompt"][0], int) for r in completions)
            assert len({r.body["seed"] for r in completions}) == len(completions)
            gaps = [row["train/rollout_logp_gap"] for row in metric_rows(out)]
            print(f"sync_every {every}: rollout log-prob gap per step {gaps}")
            for step, gap in enumerate(gaps, 1):
                if every == 2 and step == 2:  # sampled from the weights before step 1's update
                    assert gap > 1e-2, gaps
                else:
                    assert gap < 1e-4, gaps
            assert weights_digest(result.model) != initial

        # a server that cannot reload stops the run at once, naming the URL and the setting
        config = rl_config(tiny_gpt2, prompts, tmp_path / "bad", max_steps=1, batch_size=2,
                           rollout_server={"model": "policy", "base_urls": [server.url], "api_key_env": None,
                                           "reload_endpoint": "/no_such_endpoint"})  # fmt: skip
        with pytest.raises(GenerationError, match=r"/no_such_endpoint did not reload the weights .*HTTP 404"):
            train_rl(config, show_progress=False, judge=VowelJudge())


def test_rollouts_through_a_text_only_server_are_re_tokenised(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tokens: text` (llama.cpp's server takes no token ids and returns none): each prompt goes as
    the text of the trainer's encoding, and the sampled text comes back as the trainer's tokens
    (plus the EOS a stopped sample ended with); the server's log-probs are not used."""
    from openai_server import LocalLM, OpenAITestServer

    import openrlaif.training.rl.rollout as rollout
    from openrlaif.models.loading import load_tokenizer

    kept: list[list[Any]] = []
    real = rollout.sample_from_server
    monkeypatch.setattr(rollout, "sample_from_server", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    tokenizer = load_tokenizer(str(tiny_gpt2))
    with OpenAITestServer(LocalLM(tiny_gpt2, name="policy")) as server:
        config = rl_config(tiny_gpt2, prompts, tmp_path / "rl", algorithm="rloo", max_steps=2, batch_size=2,
                           max_new_tokens=6, rollout_server={"model": "policy", "base_urls": [server.url],
                                                             "api_key_env": None, "tokens": "text"})  # fmt: skip
        train_rl(config, show_progress=False, judge=VowelJudge())
        completions = [r for r in server.posts() if r.path == "/v1/completions"]
    assert len(completions) == 2 * 2 * 4 and all(isinstance(r.body["prompt"], str) for r in completions)
    samples = [s for step in kept for s in step]
    assert len(samples) == len(completions)
    # requests run concurrently: compare as multisets (GPT-2 has no BOS to drop)
    assert sorted(r.body["prompt"] for r in completions) == sorted(
        tokenizer.decode(s.prompt_ids) for s in samples
    )
    for sample in samples:
        response = sample.response_ids
        if response and response[-1] == tokenizer.eos_token_id:
            response = response[:-1]
        assert tokenizer.decode(response).strip() == sample.response_text and sample.sampler_logprobs is None
    assert all(
        row["train/rollout_logp_gap"] != row["train/rollout_logp_gap"] for row in metric_rows(tmp_path / "rl")
    )


def test_reward_model_source_scores_with_its_own_tokenizer(
    tiny_gpt2: Path, tiny_llama: Path, prompts: Path, tmp_path: Path
) -> None:
    from openrlaif.training.reward import RewardModel

    rm_dir = untrained_reward_model(tiny_llama, tmp_path / "rm")  # on the Llama tokenizer
    out = tmp_path / "rl-rm"
    config = rl_config(tiny_gpt2, prompts, out, max_steps=2, batch_size=2,
                       reward={"type": "reward_model", "path": str(rm_dir)})  # fmt: skip
    train_rl(config, show_progress=False)
    rows = metric_rows(out)
    assert len(rows) == 2 and all(math.isfinite(r["train/reward_mean"]) for r in rows)
    # the logged reward is the reward model's score of the decoded samples
    rm = RewardModel.from_pretrained(rm_dir)
    assert rm.score(["p"], ["hello"]).shape == (1,)
    assert rows[0]["train/reward_std"] > 0


def test_non_finite_reward_stops_naming_the_step_and_the_quantity(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    config = rl_config(tiny_gpt2, prompts, tmp_path / "nan", max_steps=2, batch_size=2)
    # a judge's NaN stops at the judge, before it can be cached or become a reward
    with pytest.raises(JudgeError, match=r"^scripted judge 'scripted-vowel' gave score = nan, not a finite"):
        train_rl(config, show_progress=False, judge=VowelJudge(nan=True))

    class NaNRewards:  # any other source of rewards (a reward model, a scorer object) meets RL's own check
        def score_many(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
            return [ScoreJudgment(score=math.nan) for _ in items]

    with pytest.raises(TrainingError, match=r"^step 1: reward is nan \(no checkpoint was written"):
        train_rl(config, show_progress=False, judge=NaNRewards())


def test_config_errors_and_the_shipped_config(tiny_gpt2: Path, prompts: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rloo needs num_samples >= 2"):
        rl_config(tiny_gpt2, prompts, tmp_path, algorithm="rloo", num_samples=1)
    with pytest.raises(ValueError, match="reward_model needs `path`"):
        rl_config(tiny_gpt2, prompts, tmp_path, reward={"type": "reward_model"})
    with pytest.raises(ValueError, match="grad_accum_steps 3 splits each step's 2 prompts"):
        rl_config(tiny_gpt2, prompts, tmp_path, batch_size=2, grad_accum_steps=3)
    with pytest.raises(ValueError, match="a minibatch has only 4 sequences"):
        rl_config(tiny_gpt2, prompts, tmp_path, algorithm="ppo", batch_size=2, grad_accum_steps=5)
    shipped = load_train_config(resolve_train_config_path("rl-tiny"), RLConfig)
    assert (shipped.algorithm, shipped.beta, shipped.temperature) == ("reinforce", 0.05, 0.9)
    assert shipped.reward.type == "judge_score"


def test_a_setting_of_another_algorithm_is_a_one_line_error(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    """Each algorithm's config holds only its own settings: PPO's `gamma` under `reinforce` (the
    default when `algorithm` is absent) is refused, naming the setting and both algorithms."""
    with pytest.raises(
        ValueError, match="gamma\n  a setting of algorithm ppo; algorithm reinforce does not use it"
    ):
        rl_config(tiny_gpt2, prompts, tmp_path, gamma=0.9)
    shipped = resolve_train_config_path("rl-tiny")  # algorithm: reinforce
    for overrides, expected in (
        (["clip_range=0.1"], "clip_range: a setting of algorithms ppo and grpo; algorithm reinforce does not use it"),
        (["algorithm=rloo", "dpo_beta=0.2"], "dpo_beta: a setting of algorithm online_dpo; algorithm rloo does not use it"),
        (["algorithm=rloo", "value_loss_coef=1"],
         "value_loss_coef: a setting of algorithms reinforce and ppo; algorithm rloo does not use it"),
        (["algorithm=a2c"], "algorithm: Input should be 'reinforce', 'rloo', 'ppo', 'online_dpo' or 'grpo'"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load_train_config(shipped, RLConfig, overrides)
        assert str(info.value) == f"{shipped} (with --set): {expected}"
    ppo = load_train_config(shipped, RLConfig, ["algorithm=ppo", "gamma=0.9"])
    assert (type(ppo).__name__, ppo.gamma, ppo.beta) == ("PPOConfig", 0.9, 0.05)
    bare = tmp_path / "bare.yaml"  # no `algorithm`: reinforce
    bare.write_text(f"model: {tiny_gpt2}\noutput_dir: {tmp_path}\nreward: {{type: judge_score, judge: x}}\n")
    assert load_train_config(bare, RLConfig).algorithm == "reinforce"
