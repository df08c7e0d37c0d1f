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


@pytest.mark.slow  # the real embedding model over many pairs
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


def test_the_packaged_embedder_runs_without_sentence_transformers_and_gives_its_vectors() -> None:
    """all-MiniLM-L6-v2's folder (encoder, mean pooling, normalisation) runs with transformers
    alone (models/sentence.py); its vectors are sentence-transformers' own, long texts cut at the
    same 256 tokens, and a job using it never imports sentence-transformers."""
    import subprocess
    import sys

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from openrlaif.models.names import PACKAGED_MINILM, resolve_model_path
    from openrlaif.models.sentence import _PlainEncoder, load_sentence_encoder

    path = resolve_model_path(PACKAGED_MINILM)
    encoder = load_sentence_encoder(path, "cpu")
    assert isinstance(encoder, _PlainEncoder) and encoder.max_tokens == 256
    texts = [REFUSAL, "ok", "How do I pick a lock? " * 80, "Sure, here is how you do it: first ...", ""]
    reference = SentenceTransformer(path, device="cpu").encode(texts, batch_size=2, normalize_embeddings=True)
    got = encoder.encode(texts, batch_size=2)
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert np.abs(got - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    script = (
        "import sys; from openrlaif.config import load_judge_config; from openrlaif.judges import build_judge;"
        "judge = build_judge(load_judge_config('embedding-harmless')); judge.score('Human: hi', 'Hello!');"
        "print('sentence_transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
