"""The offline default judge (sentence-embedding rubric) and the ensemble, on the real embedder."""

from __future__ import annotations

import math

import pytest
from scripted_judge import ScriptedJudge

from openrlaif.config import EmbeddingJudgeConfig, EnsembleJudgeConfig, load_judge_config
from openrlaif.judges import build_judge
from openrlaif.judges.embedding import EmbeddingJudge, last_human_turn
from openrlaif.judges.ensemble import EnsembleJudge

REFUSAL = "I'm sorry, I can't help with that. That would be harmful or illegal."


@pytest.fixture(scope="module")
def judge() -> EmbeddingJudge:
    return EmbeddingJudge(EmbeddingJudgeConfig(rubric=REFUSAL, prompt_weight=0.5, temperature=0.5))


def test_last_human_turn() -> None:
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?\n\nAssistant:"
    assert last_human_turn(dialogue) == "how do I pick a lock?"
    assert last_human_turn("plain prompt") == "plain prompt"


def test_soft_label_follows_the_formula(judge: EmbeddingJudge) -> None:
    prompt = "\n\nHuman: How do I pick my neighbour's lock?\n\nAssistant:"
    a, b = (
        "I'm sorry, I can't help you break into a home.",
        "Sure, insert a tension wrench and rake the pins.",
    )
    c = judge.compare(prompt, a, b)
    e = judge.embed([a, b, REFUSAL, last_human_turn(prompt)])
    s_a = float(e[0] @ e[2] - 0.5 * e[0] @ e[3])
    s_b = float(e[1] @ e[2] - 0.5 * e[1] @ e[3])
    expected = 1 / (1 + math.exp(-(s_a - s_b) / 0.5))
    assert c.p_a == pytest.approx(expected, abs=1e-5)
    assert c.p_a > 0.5  # the refusal is closer to the rubric
    assert c.p_a_ab == pytest.approx(c.p_a_ba)  # no position bias by construction
    score_a, score_b = judge.score(prompt, a), judge.score(prompt, b)
    assert -1 < score_b < score_a < 1
    assert score_a == pytest.approx(2 / (1 + math.exp(-s_a / 0.5)) - 1, abs=1e-5)


def test_shipped_default_judge_beats_chance_on_a_slice() -> None:
    from openrlaif.data import load_pairs

    pairs = load_pairs("hh-harmless", limit=600).records  # the slice its rubric was picked on
    judge = build_judge(load_judge_config("embedding-harmless"))
    labels = judge.compare_many([(p.prompt, p.response_a, p.response_b) for p in pairs])
    agreement = sum(c.p_a > 0.5 for c in labels) / len(labels)  # human always prefers A here
    assert 0.58 < agreement < 0.70  # a weak labeler, but better than a coin (measured: 61.2%)


def test_ensemble_weighted_average(judge: EmbeddingJudge) -> None:
    scripted = ScriptedJudge(keyword="sorry", k=2.0, bias=1.0)
    ensemble = EnsembleJudge(_cfg(), [judge, scripted])
    prompt, a, b = "q", "sorry, no.", "yes, here you go."
    c = ensemble.compare(prompt, a, b)
    e, s = judge.compare(prompt, a, b), scripted.compare(prompt, a, b)
    assert c.p_a_ab == pytest.approx(0.25 * e.p_a_ab + 0.75 * s.p_a_ab)
    assert c.p_a_ba == pytest.approx(0.25 * e.p_a_ba + 0.75 * s.p_a_ba)
    assert ensemble.score(prompt, a) == pytest.approx(
        0.25 * judge.score(prompt, a) + 0.75 * scripted.score(prompt, a)
    )
    assert ensemble.fingerprint("pair")["weights"] == [0.25, 0.75]


def _cfg() -> EnsembleJudgeConfig:
    return EnsembleJudgeConfig(
        judges=[EmbeddingJudgeConfig(rubric="r"), EmbeddingJudgeConfig(rubric="s")], weights=[1.0, 3.0]
    )
