"""Evaluation: the maths against hand-computed cases, then `evaluate()` / `openrlaif eval` end to end
with a scripted judge, responses files and a tiny local model (sampling, resume, contract)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scripted_judge import ScriptedJudge

from openrlaif.cli import main
from openrlaif.data.datasets import hh_harmless_split
from openrlaif.data.records import PromptRecord
from openrlaif.data.refs import prompt_records
from openrlaif.errors import ConfigError, OpenRLAIFError
from openrlaif.evaluation.evaluate import EvalSettings, distinct_share, evaluate
from openrlaif.evaluation.winrate import (
    RIDGE,
    fit_logistic,
    harmless_rate,
    length_controlled_win_rate,
    length_stats,
    orders_agree,
    pair_outcome,
    win_rate,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- maths


def test_pair_outcome_and_tie_rule() -> None:
    assert pair_outcome(0.8, 0.7) == 1.0  # both orders prefer A
    assert pair_outcome(0.2, 0.4) == 0.0  # both prefer B
    assert pair_outcome(0.9, 0.3) == 0.5  # orders disagree: a tie although p_a = 0.6
    assert pair_outcome(0.5, 0.5) == 0.5  # identical responses
    assert pair_outcome(0.52, 0.5) == 1.0  # p_a = 0.51, one order undecided: no disagreement
    assert pair_outcome(0.52, 0.5, tie_margin=0.02) == 0.5  # |0.51 - 0.5| <= 0.02
    assert pair_outcome(0.56, 0.54, tie_margin=0.02) == 1.0  # |0.55 - 0.5| > 0.02
    assert orders_agree(0.8, 0.7) and not orders_agree(0.9, 0.3) and not orders_agree(0.5, 0.5)


def test_win_rate_counts_ties_half_with_a_bootstrap_ci() -> None:
    wr = win_rate([1, 1, 1, 0.5, 0])
    assert wr.value == pytest.approx(3.5 / 5)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (3, 1, 1, 5)
    assert wr.ci95[0] < wr.value < wr.ci95[1]
    assert win_rate([1, 1, 1, 0.5, 0]).ci95 == wr.ci95  # seeded
    assert win_rate([0.5] * 10).ci95 == (0.5, 0.5)  # no spread, no interval
    # Half wins, half losses, n = 400: the bootstrap CI is the normal one, 0.5 ± 1.96·0.5/√400.
    big = win_rate([1, 0] * 200, n_resamples=4000)
    assert big.value == 0.5
    assert big.ci95[0] == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert big.ci95[1] == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        win_rate([1, 0.7])


def test_length_controlled_win_rate_hand_computed() -> None:
    # Two length ratios only, x = ±c (A 10 chars vs B 4, and the reverse): the logistic model is
    # saturated, so σ(β0 + β1·c) = mean outcome at +c = 4/5 and σ(β0 - β1·c) = mean at -c = 1/2
    # (two ties). Hence β0 = (logit 0.8 + logit 0.5) / 2 = log 2, LC = σ(log 2) = 2/3, and
    # β1 = (logit 0.8 - logit 0.5) / (2c) = log 4 / (2c), with c = log(11/5) (lengths + 1).
    outcomes = [1, 1, 1, 1, 0, 0.5, 0.5]
    len_a, len_b = [10] * 5 + [4] * 2, [4] * 5 + [10] * 2
    lc = length_controlled_win_rate(outcomes, len_a, len_b, n_resamples=200)
    assert win_rate(outcomes).value == pytest.approx(5 / 7)
    assert lc.value == pytest.approx(2 / 3, abs=1e-5)
    assert lc.intercept == pytest.approx(math.log(2), abs=1e-5)
    assert lc.coef_log_length_ratio == pytest.approx(math.log(4) / (2 * math.log(11 / 5)), abs=1e-5)
    assert lc.ci95 is not None and lc.ci95[0] < lc.value < lc.ci95[1]
    # Swapping A and B gives exactly 1 - LC (the log ratio is antisymmetric); the length effect stays.
    swapped = length_controlled_win_rate([1 - y for y in outcomes], len_b, len_a, n_resamples=0)
    assert swapped.value == pytest.approx(1 / 3, abs=1e-5)
    assert swapped.coef_log_length_ratio == pytest.approx(lc.coef_log_length_ratio, abs=1e-5)


def test_a_win_bought_with_length_alone_is_50_percent_length_controlled() -> None:
    # The judge prefers the longer response 3 times in 4 whoever wrote it; A is longer in 12 of
    # 16 pairs. Raw win rate (9 + 1) / 16 = 62.5%; at equal length: logit 0.75 + logit 0.25 = 0 -> 50%.
    outcomes = [1] * 9 + [0] * 3 + [0] * 3 + [1]
    len_a, len_b = [200] * 12 + [100] * 4, [100] * 12 + [200] * 4
    assert win_rate(outcomes).value == pytest.approx(0.625)
    lc = length_controlled_win_rate(outcomes, len_a, len_b, n_resamples=0)
    assert lc.value == pytest.approx(0.5, abs=1e-6) and lc.coef_log_length_ratio > 0
    # Equal lengths everywhere: nothing to control for, LC = the raw win rate.
    equal = length_controlled_win_rate([1, 1, 0, 0.5], [5] * 4, [5] * 4, n_resamples=0)
    assert equal.value == pytest.approx(0.625, abs=1e-6)


def test_logistic_fit_matches_the_likelihood_optimum_and_stays_finite_when_separable() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.3 + 1.5 * x)))).astype(float)
    b0, b1 = fit_logistic(x, y)
    p = 1 / (1 + np.exp(-(b0 + b1 * x)))
    # The score equations (with the negligible ridge): X'(y - p) = RIDGE·β.
    assert np.sum(y - p) == pytest.approx(RIDGE * b0, abs=1e-9)
    assert np.sum((y - p) * x) == pytest.approx(RIDGE * b1, abs=1e-9)
    assert b0 == pytest.approx(0.3, abs=0.35) and b1 == pytest.approx(1.5, abs=0.5)
    lc = length_controlled_win_rate([1, 1, 1], [1, 2, 3], [3, 2, 1], n_resamples=20)  # A wins all
    assert 0.99 < lc.value <= 1.0 and math.isfinite(lc.intercept)


def test_harmless_rate_and_lengths() -> None:
    scores = [-0.5, 0.1, 0.0, 0.9]
    assert harmless_rate(scores).value == 0.5  # 0.0 is not above the threshold 0
    assert harmless_rate(scores, threshold=-1).value == 1.0
    assert harmless_rate(scores, threshold=0.5).value == 0.25
    low, high = harmless_rate([1.0] * 3 + [-1.0]).ci95
    assert low <= 0.75 <= high
    assert length_stats([1, 2, 3, 10]) == {"mean_chars": 4.0, "median_chars": 2.5}


def test_held_out_prompts_never_overlap_the_training_part() -> None:
    train = {p.prompt for p in hh_harmless_split("train")}
    held_out = prompt_records("hh-harmless:eval")
    assert len(held_out) == 596  # 598 eval pairs, less a prompt also in train and a repeat
    assert all(int(p.id.rsplit("-", 1)[1]) > 1200 for p in held_out)
    assert not {p.prompt for p in held_out} & train
    assert len({p.prompt for p in held_out}) == len(held_out)
    assert prompt_records("hh-harmless:eval", limit=3) == held_out[:3]
    with pytest.raises(ConfigError, match="neither a file nor a built-in dataset"):
        prompt_records("no-such-thing")


# ---------------------------------------------------------------- evaluate()

PROMPTS = ["\n\nHuman: q1\n\nAssistant:", "\n\nHuman: q2\n\nAssistant:", "\n\nHuman: q3\n\nAssistant:",
           "\n\nHuman: q4\n\nAssistant:"]  # fmt: skip
A_SAYS = ["safe safe", "hmm", "safe", "safe it is"]
B_SAYS = ["no", "safe", "safe!", "ok"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def responses_file(path: Path, texts: list[str], prompts: list[str] = PROMPTS) -> Path:
    return write_jsonl(
        path,
        [
            {"id": f"r{i}", "prompt": p, "response": t}
            for i, (p, t) in enumerate(zip(prompts, texts, strict=False))
        ],
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_evaluate_responses_files_hand_computed(tmp_path: Path) -> None:
    # The scripted judge: P(first preferred) = σ(#"safe"(first) - #"safe"(second) + 0.5), a
    # position bias of 0.5. Pair 1: +2 -> A wins; pair 2: -1 -> B wins; pair 3: equal counts, so
    # order AB gives σ(0.5) > 0.5 and order BA gives 1 - σ(0.5) < 0.5: the orders disagree -> tie;
    # pair 4: +1 -> A wins. Win rate (1 + 0 + 0.5 + 1) / 4 = 62.5%.
    a, b = responses_file(tmp_path / "a.jsonl", A_SAYS), responses_file(tmp_path / "b.jsonl", B_SAYS)
    judge = ScriptedJudge(bias=0.5)
    summary = evaluate(a, b, None, judge, tmp_path / "eval", show_progress=False)
    assert summary["win_rate"] | {"ci95": None} == {
        "value": 0.625, "ci95": None, "wins": 2, "ties": 1, "losses": 1, "n": 4
    }  # fmt: skip
    assert summary["order_agreement"] == 0.75
    assert summary["distinct_responses"] == {"a": 1.0, "b": 1.0}
    assert distinct_share(["I'm sorry", "I'm sorry", "ok", "I'm sorry"]) == 0.5  # a collapsed policy: 2 of 4
    # Harmless: score tanh(#"safe") > 0 -> A 3 of 4, B 2 of 4.
    assert summary["harmless_rate"]["a"]["value"] == 0.75 and summary["harmless_rate"]["b"]["value"] == 0.5
    assert summary["length"]["a"] == {"mean_chars": np.mean([len(t) for t in A_SAYS]),
                                      "median_chars": float(np.median([len(t) for t in A_SAYS]))}  # fmt: skip
    assert summary["a"]["name"] == "a" and summary["b"]["name"] == "b" and summary["prompts"] == 4
    assert summary["judge"] == judge.identity("pair").to_dict()
    assert summary["harmless_rate"]["judge"] == judge.identity("score").to_dict()
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("win_rate", "length_controlled_win_rate", "harmless_rate", "length", "order_agreement"):
        assert key in on_disk
    assert set(on_disk["length_controlled_win_rate"]) >= {"value", "ci95", "coef_log_length_ratio"}

    samples = read_rows(tmp_path / "eval" / "samples.jsonl")
    assert [s["outcome"] for s in samples] == [1.0, 0.0, 0.5, 1.0]
    first = samples[0]
    assert set(first) == {"id", "prompt", "response_a", "response_b", "p_a", "p_a_ab", "p_a_ba", "outcome",
                          "harmless_a", "harmless_b", "len_a", "len_b"}  # fmt: skip
    assert first["p_a_ab"] == pytest.approx(sigmoid(2.5)) and first["p_a_ba"] == pytest.approx(sigmoid(1.5))
    assert first["p_a"] == pytest.approx((sigmoid(2.5) + sigmoid(1.5)) / 2)
    assert first["harmless_a"] == pytest.approx(math.tanh(2)) and first["len_b"] == 2
    assert first["id"] == "r0"  # from the responses file

    # Run again: every judgment and score is in the output files; nothing is judged twice.
    again = ScriptedJudge(bias=0.5)
    assert evaluate(a, b, None, again, tmp_path / "eval", show_progress=False) == summary
    assert again.order_calls == [] and again.score_calls == []
    # A separate harmless judge (counts "no") scores each response alone; the pair judge is unchanged.
    counts_no = ScriptedJudge(keyword="no")
    split = evaluate(a, b, None, again, tmp_path / "eval", harmless_judge=counts_no, show_progress=False)
    assert split["harmless_rate"]["a"]["value"] == 0.0 and split["harmless_rate"]["b"]["value"] == 0.25
    assert (
        split["harmless_rate"]["judge"]["model"] == "scripted-no" and split["win_rate"] == summary["win_rate"]
    )
    # Another judge in the same folder never reuses the first judge's rows.
    other = ScriptedJudge(bias=0.0)
    evaluate(a, b, None, other, tmp_path / "eval", show_progress=False)
    assert len(other.order_calls) == 8
    assert [s["outcome"] for s in read_rows(tmp_path / "eval" / "samples.jsonl")] == [1.0, 0.0, 0.5, 1.0]


def test_missing_response_and_bad_sides_are_one_line_errors(tmp_path: Path) -> None:
    a = responses_file(tmp_path / "a.jsonl", A_SAYS)
    short = responses_file(tmp_path / "short.jsonl", B_SAYS[:3])
    prompts = [PromptRecord(f"p{i}", p) for i, p in enumerate(PROMPTS)]
    with pytest.raises(
        OpenRLAIFError, match=r"short.jsonl: no response to 1 of the 4 prompts \(first: id 'p3'\)"
    ):
        evaluate(a, short, prompts, ScriptedJudge(), tmp_path / "e", show_progress=False)
    with pytest.raises(ConfigError, match="b: responses file .*missing.jsonl not found"):
        evaluate(a, tmp_path / "missing.jsonl", None, ScriptedJudge(), tmp_path / "e", show_progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": PROMPTS[0], "response": 3}])
    with pytest.raises(OpenRLAIFError, match=r"bad.jsonl:1: field 'response' must be a string"):
        evaluate(a, bad, None, ScriptedJudge(), tmp_path / "e", show_progress=False)


def test_model_side_is_sampled_in_process_and_a_killed_run_resumes(tiny_gpt2: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlaif.inference.local import sample

    prompts = [PromptRecord(f"p{i}", p) for i, p in enumerate(PROMPTS)]
    b = responses_file(tmp_path / "b.jsonl", B_SAYS)
    settings = EvalSettings(max_new_tokens=6, bootstrap_resamples=200)
    out = tmp_path / "eval"
    summary = evaluate(tiny_gpt2, b, prompts, ScriptedJudge(), out, settings=settings, show_progress=False)
    samples = read_rows(out / "samples.jsonl")

    # A's responses are the policy's greedy samples (temperature 0 by default).
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    expected = sample(model, tokenizer, PROMPTS, n=1, temperature=0.0, max_new_tokens=6)
    assert [s["response_a"] for s in samples] == [e.response_text for e in expected]
    assert [s["response_b"] for s in samples] == B_SAYS
    assert summary["a"]["kind"] == "model" and summary["b"]["kind"] == "responses"
    assert summary["a"]["name"] == tiny_gpt2.name
    responses = Path(summary["a"]["responses"])
    assert responses.parent == out and len(read_rows(responses)) == 4

    # Kill mid-way: the last sample, judgment and score were never written (a torn line too).
    for name in (responses, out / "judgments.jsonl", out / "harmless.jsonl"):
        lines = name.read_text().splitlines(keepends=True)
        name.write_text("".join(lines[:-1]) + lines[-1][:10])
    (out / "eval.json").unlink()
    judge = ScriptedJudge()
    resumed = evaluate(tiny_gpt2, b, prompts, judge, out, settings=settings, show_progress=False)
    assert len(judge.order_calls) == 2  # one pair, two orders
    assert len(judge.score_calls) == 1  # one response (harmless.jsonl's last row)
    assert len(read_rows(responses)) == 4
    assert resumed == summary and read_rows(out / "samples.jsonl") == samples


def test_same_model_both_sides_is_sampled_once_and_ties(tiny_gpt2: Path, tmp_path: Path) -> None:
    prompts = [PromptRecord(f"p{i}", p) for i, p in enumerate(PROMPTS[:2])]
    settings = EvalSettings(max_new_tokens=4, bootstrap_resamples=100)
    summary = evaluate(tiny_gpt2, tiny_gpt2, prompts, ScriptedJudge(), tmp_path / "e", settings=settings,
                       show_progress=False)  # fmt: skip
    assert summary["a"]["responses"] == summary["b"]["responses"]
    assert summary["win_rate"]["value"] == 0.5 and summary["win_rate"]["ties"] == 2


def test_eval_cli_prints_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import openrlaif.cli.evaluate

    monkeypatch.setattr(openrlaif.cli.evaluate, "open_judge_from_args", lambda args: ScriptedJudge(bias=0.5))
    a, b = responses_file(tmp_path / "a.jsonl", A_SAYS), responses_file(tmp_path / "b.jsonl", B_SAYS)
    out = tmp_path / "eval"
    code = main(["eval", "--a", str(a), "--b", str(b), "--out", str(out), "--quiet", "--name-a", "rl"])
    text = capsys.readouterr().out
    assert code == 0
    assert "win rate of A" in text and "62.5%" in text and "2W 1T 1L of 4" in text
    assert "harmless rate A" in text and "75.0%" in text and "length-controlled" in text
    assert "rl does not beat b clearly: the 95% CI of the win rate includes 50%" in text
    assert json.loads((out / "eval.json").read_text())["a"]["name"] == "rl"
    code = main(["eval", "--a", str(a), "--b", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert code == 2 and "error: b: responses file" in capsys.readouterr().err
    code = main(["eval", "--a", str(a), "--b", str(b), "--out", str(out), "--limit", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["prompts"] == 2
