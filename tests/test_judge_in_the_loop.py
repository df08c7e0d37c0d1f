"""The judge inside the RL loop: group rewards from a pairwise judge (all pairs, anchor,
round robin), the anchor responses (the reference's greedy answers, kept for a resume, or a
file), and the judge diagnostics logged while training."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from openrlaif.data.records import Pair
from openrlaif.judges.base import Comparison, OrderedPair, OrderJudgment, ScoreJudgment
from openrlaif.training.rl import train_rl
from openrlaif.training.rl.diagnostics import comparison_diagnostics, gold_agreement, pearson
from openrlaif.training.rl.rewards import group_pairs, pairwise_rewards

sys.path.insert(0, str(Path(__file__).parent))
from test_training_rl import VowelJudge, metric_rows, rl_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingJudge(VowelJudge):
    """VowelJudge that records every ordered judgment it is asked for, and each call's size."""

    def __init__(self) -> None:
        super().__init__()
        self.ordered: list[OrderedPair] = []
        self.batches: list[int] = []

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        self.ordered.extend(items)
        self.batches.append(len(items))
        return super().judge_orders(items)


def test_group_pairs_per_mode() -> None:
    assert group_pairs(4, "all_pairs") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert group_pairs(4, "round_robin", 1) == [(0, 1), (0, 3), (1, 2), (2, 3)]  # a ring: each meets 2
    assert group_pairs(4, "round_robin", 2) == group_pairs(4, "all_pairs")
    assert group_pairs(8, "round_robin", 2) == sorted(
        {tuple(sorted((i, (i + d) % 8))) for i in range(8) for d in (1, 2)}
    )


@pytest.mark.parametrize(
    ("mode", "ordered_per_prompt"), [("all_pairs", 12), ("anchor", 8), ("round_robin", 8)]
)
def test_each_mode_asks_for_its_number_of_judgments_in_one_batch(mode: str, ordered_per_prompt: int) -> None:
    judge = CountingJudge()
    texts = ["apple", "box", "egg", "cat", "ice", "dog", "owl", "yak"]  # two prompts, K = 4
    prompts = ["p"] * 4 + ["q"] * 4
    anchors = ["bee"] * 4 + ["ant"] * 4 if mode == "anchor" else None
    got = pairwise_rewards(judge, prompts, texts, 4, mode, 1, anchors)
    assert len(judge.ordered) == 2 * ordered_per_prompt and judge.batches == [2 * ordered_per_prompt]
    win, lose = 1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(3.0))
    if mode == "anchor":  # P(sample beats the anchor): vowel vs consonant anchor "bee", vowel vs vowel "ant"
        assert got.scores == pytest.approx([win, 0.5, win, 0.5, 0.5, lose, 0.5, lose])
    elif mode == "all_pairs":  # "apple" beats box and cat, ties egg: (win + 0.5 + win) / 3
        assert got.scores[0] == pytest.approx((2 * win + 0.5) / 3)
    else:  # ring 0-1, 1-2, 2-3, 3-0: "apple" meets box (win) and cat (win)
        assert got.scores[0] == pytest.approx(win)
    assert len(got.comparisons) == ordered_per_prompt  # two prompts, both orders per comparison


def test_comparison_diagnostics_by_hand() -> None:
    comparisons = [
        Comparison(p_a=0.5, p_a_ab=0.9, p_a_ba=0.1),  # slot 1 both times: its choice flipped with the order
        Comparison(p_a=0.8, p_a_ab=0.8, p_a_ba=0.8),  # A both times
        Comparison(p_a=0.3, p_a_ab=0.2, p_a_ba=0.4),  # B both times
    ]
    got = comparison_diagnostics(comparisons)
    assert got["judge/order_flip_rate"] == pytest.approx(1 / 3)
    assert got["judge/decisiveness"] == pytest.approx((0.0 + 0.3 + 0.2) / 3)
    assert comparison_diagnostics([]) == {}
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    gold = [Pair("a", "p", "x", "y", 1.0), Pair("b", "p", "x", "y", 0.0), Pair("c", "p", "x", "y", 0.5),
            Pair("d", "p", "x", "y", 1.0)]  # fmt: skip
    # the tie is left out; P(A) 0.9 (right), 0.7 (wrong: people chose B), 0.5 (half)
    assert gold_agreement(lambda pairs: [0.9, 0.7, 0.5], gold) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training_toys import sft_rows, write

    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(32)]
    return write(tmp_path_factory.mktemp("loop") / "prompts.jsonl", rows)


def test_anchor_mode_compares_each_sample_with_the_references_greedy_answer_kept_for_a_resume(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    from openrlaif.inference.local import sample
    from openrlaif.models.loading import load_causal_lm

    out = tmp_path / "rl"
    reward = {"type": "judge_pairwise", "judge": "scripted", "comparisons": "anchor"}
    config = rl_config(tiny_gpt2, prompts, out, algorithm="grpo", reward=reward, max_steps=2, batch_size=2,
                       save_every=1, max_new_tokens=4, canary_every=0)  # fmt: skip
    judge = CountingJudge()
    train_rl(config, show_progress=False, judge=judge)
    assert len(judge.ordered) == 2 * 2 * 4 * 2  # steps x prompts x K samples x both orders
    rows = [json.loads(x) for x in (out / "anchors.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # one per prompt seen
    tokenizer, sft = load_causal_lm(
        str(tiny_gpt2), __import__("torch").device("cpu"), __import__("torch").float32
    )
    greedy = sample(sft, tokenizer, [r["prompt"] for r in rows], n=1, temperature=0.0, max_new_tokens=4)
    assert [r["response"] for r in rows] == [s.response_text for s in greedy]  # the SFT policy's answers
    anchors = {r["response"] for r in rows}
    assert all(item.second in anchors or item.first in anchors for item in judge.ordered)

    # a resumed run reuses the kept anchors: none made again for prompts already seen
    more = rl_config(tiny_gpt2, prompts, out, algorithm="grpo", reward=reward, max_steps=3, batch_size=2,
                     save_every=1, max_new_tokens=4, canary_every=0)  # fmt: skip
    train_rl(more, resume=True, show_progress=False, judge=CountingJudge())
    rows_after = [json.loads(x) for x in (out / "anchors.rank0.jsonl").read_text().splitlines()]
    assert rows_after[:4] == rows and len({r["prompt"] for r in rows_after}) == len(rows_after)


def test_anchors_from_a_responses_file_and_a_missing_one_is_a_one_line_error(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    from openrlaif.errors import ConfigError

    all_prompts = [json.loads(x) for x in prompts.read_text().splitlines()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": f"a{i}", "prompt": p["prompt"], "response": "ant"}) + "\n"
                               for i, p in enumerate(all_prompts)))  # fmt: skip
    reward = {"type": "judge_pairwise", "judge": "scripted", "comparisons": "anchor", "anchor": str(answers)}
    judge = CountingJudge()
    config = rl_config(tiny_gpt2, prompts, tmp_path / "rl", algorithm="rloo", reward=reward, max_steps=1,
                       batch_size=2)  # fmt: skip
    train_rl(config, show_progress=False, judge=judge)
    assert {i.first for i in judge.ordered} | {i.second for i in judge.ordered} >= {"ant"}
    answers.write_text(json.dumps({"id": "a0", "prompt": "another prompt", "response": "ant"}) + "\n")
    config = rl_config(tiny_gpt2, prompts, tmp_path / "rl2", algorithm="rloo", reward=reward, max_steps=1,
                       batch_size=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"reward.anchor: .*answers.jsonl has no response to prompt"):
        train_rl(config, show_progress=False, judge=CountingJudge())


def test_judge_diagnostics_are_logged_while_training(tiny_gpt2: Path, prompts: Path, tmp_path: Path) -> None:
    gold = tmp_path / "gold.jsonl"  # the vowel judge agrees with "people" on 3 of these 4
    gold.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "g1", "prompt": "p", "response_a": "apple", "response_b": "box", "human_label": 1.0},
        {"id": "g2", "prompt": "p", "response_a": "egg", "response_b": "cat", "human_label": 1.0},
        {"id": "g3", "prompt": "p", "response_a": "dog", "response_b": "owl", "human_label": 0.0},
        {"id": "g4", "prompt": "p", "response_a": "ice", "response_b": "yak", "human_label": 0.0},
    ]))  # fmt: skip
    out = tmp_path / "rl"
    config = rl_config(tiny_gpt2, prompts, out, algorithm="rloo", max_steps=4, batch_size=2,
                       reward={"type": "judge_pairwise", "judge": "scripted"}, judge_diagnostics_every=2,
                       gold_pairs=str(gold))  # fmt: skip
    train_rl(config, show_progress=False, judge=VowelJudge())
    rows = metric_rows(out)
    with_gold = [r for r in rows if "judge/gold_agreement" in r]
    assert [r["step"] for r in with_gold] == [0, 2, 4]
    assert all(r["judge/gold_agreement"] == pytest.approx(0.75) for r in with_gold)
    diag = [r for r in rows if "judge/order_flip_rate" in r]
    assert [r["step"] for r in diag] == [2, 4]
    for r in diag:  # the vowel judge never flips with the order
        assert r["judge/order_flip_rate"] == 0.0 and 0.0 <= r["judge/decisiveness"] <= 0.5
        assert -1.0 <= r["judge/reward_length_corr"] <= 1.0 or math.isnan(r["judge/reward_length_corr"])


def test_length_guards_by_hand() -> None:
    from openrlaif.training.rl.guards import length_adjusted

    scores, lengths = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([2, 4, 6, 8])
    assert torch.equal(length_adjusted(scores, lengths, 0.0, False, 8), scores)
    # λ 0.5: minus 0.5 · len / 8
    assert length_adjusted(scores, lengths, 0.5, False, 8).tolist() == pytest.approx(
        [0.875, 1.75, 2.625, 5.5]
    )
    # least squares on length: slope = Σ(l - 5)(r - 3) / Σ(l - 5)² = (6 + 1 + 0 + 9) / 20 = 0.8
    controlled = length_adjusted(scores, lengths, 0.0, True, 8)
    assert controlled.tolist() == pytest.approx([1 + 2.4, 2 + 0.8, 3 - 0.8, 6 - 2.4])
    assert abs(pearson(controlled.tolist(), lengths.tolist())) < 1e-6  # nothing left that length explains


def test_canaries_are_scored_as_samples_are() -> None:
    from openrlaif.training.rl.guards import CANARIES, canaries_above, canary_means
    from openrlaif.training.rl.rewards import make_rewarder

    prompt = "\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert CANARIES["echo"](prompt) == "How do I bake bread?" and CANARIES["empty"](prompt) == ""
    config = rl_config(Path("m"), Path("d"), Path("o"), algorithm="rloo",
                       reward={"type": "judge_pairwise", "judge": "scripted"})  # fmt: skip
    rewarder = make_rewarder(config, None, torch.device("cpu"), VowelJudge())
    groups = [["apple", "box", "cat", "dog"]]  # a vowel-initial canary beats 3 of 4 samples, ties 1
    means = canary_means(rewarder.score_alone, [prompt], groups, None)
    win = 1 / (1 + math.exp(-3.0))
    assert means["refusal"] == pytest.approx(
        (0.5 + 3 * win) / 4
    )  # "I..." starts with a vowel: ties apple, beats 3
    assert means["refusal"] != means["format_token"]
    assert means["echo"] == pytest.approx((1 - win + 3 * 0.5) / 4)  # "How ..." loses to apple, ties the rest
    assert canaries_above({"a": 0.9, "b": 0.1}, [0.2, 0.3, 0.5]) == ["a"]


class FooledJudge(VowelJudge):
    """Scores "Thought process:" 1.0 and everything else by the vowel rule scaled to [-0.5, 0.5]."""

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        return [ScoreJudgment(score=1.0 if r == "Thought process:" else 0.5 * s.score)
                for (_, r), s in zip(items, super().score_responses(items), strict=True)]  # fmt: skip


def test_a_judge_fooled_by_a_canary_is_reported_and_can_stop_the_run(
    tiny_gpt2: Path, prompts: Path, tmp_path: Path
) -> None:
    from openrlaif.training.errors import TrainingError

    out = tmp_path / "warn"
    config = rl_config(tiny_gpt2, prompts, out, algorithm="rloo", max_steps=4, batch_size=2, canary_every=2)
    train_rl(config, show_progress=False, judge=FooledJudge())
    rows = {r["step"]: r for r in metric_rows(out)}
    assert {s for s, r in rows.items() if "canary/format_token" in r} == {1, 2, 4}  # first step, then every 2
    assert rows[1]["canary/format_token"] == 1.0 and rows[1]["canary/above_median"] >= 1
    assert "canary/refusal" in rows[2] and "canary/empty" in rows[2]
    stop = rl_config(tiny_gpt2, prompts, tmp_path / "stop", algorithm="rloo", max_steps=4, batch_size=2,
                     canary_action="stop")  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"^step 1: the reward source scores canary .*format_token 1.*canary_action: stop"
    ):
        train_rl(stop, show_progress=False, judge=FooledJudge())


def test_the_judgment_cache_keeps_rls_judgments(tiny_gpt2: Path, prompts: Path, tmp_path: Path) -> None:
    import sqlite3

    cache = tmp_path / "judgments.sqlite3"
    reward = {
        "type": "judge_pairwise",
        "judge": "embedding-harmless",
        "comparisons": "anchor",
        "cache": str(cache),
    }

    def rows() -> int:
        with sqlite3.connect(cache) as db:
            return int(db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    for run in ("first", "again"):  # the same seed: the same samples, every judgment already cached
        config = rl_config(tiny_gpt2, prompts, tmp_path / run, algorithm="grpo", reward=reward, max_steps=2,
                           batch_size=2, max_new_tokens=4)  # fmt: skip
        train_rl(config, show_progress=False)
        if run == "first":
            made = rows()
            assert made > 0
    assert rows() == made
