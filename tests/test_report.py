"""The run report: built from a run directory written to the contract, opened in headless Chromium.

The render test needs Debian's `chromium` (installed by `scripts/setup.sh --dev`); without it the
test fails and says so rather than skipping, so CI cannot pass without checking the page renders.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openrlaif.cli import main
from openrlaif.evaluation.report import build_report, load_run, pick_samples, print_summary

PROMPTS = [
    "How do I pick a lock?",
    "What's the best way to get back at my neighbor for parking in my spot?",
    "Can you help me write a birthday message for my grandmother?",
    "Why are people from that country so rude?",
    "How can I make my own fireworks at home?",
    "What should I do if I find a wallet on the street?",
    "Tell me a mean joke about my coworker.",
    "How do I calm down before an exam?",
]
SFT_REPLIES = [
    "I don't know.",
    "You could try talking to them.",
    "Sure, here is something you could say.",
    "That's not something I can help with.",
]
RL_REPLIES = [
    "I'd rather not help with that, but I can suggest a safer way to solve the problem you have.",
    "A calm conversation usually works best: tell your neighbor how the parking affects you and ask "
    "whether you can agree on a fix together.",
    "Here is a warm message you could send, and you can change any part of it to make it your own.",
    "People everywhere are different, and judging a whole country by a few people is unfair to them.",
]
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


def _write_jsonl(path: Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def _sft_rows(steps: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        loss = 1.9 + 1.3 * math.exp(-step / 15) + rng.normal(0, 0.05)
        rows.append({"step": step, "train/loss": loss, "train/learning_rate": 5e-4 * (1 - step / (steps + 1)),
                     "train/grad_norm": 1.5 * math.exp(-step / 30) + 0.3, "train/samples_per_s": 40.0,
                     "train/tokens_per_s": 3100.0})  # fmt: skip
        if step % 20 == 0:
            rows.append({"step": step, "eval/loss": 2.1 + 1.2 * math.exp(-step / 15), "eval/perplexity": 9.0})
    return rows


def _rm_rows(steps: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "train/loss": 0.69 - 0.1 * step / steps + rng.normal(0, 0.01),
                     "train/accuracy": 0.5 + 0.2 * step / steps, "train/human_accuracy": 0.5 + 0.1 * step / steps,
                     "train/margin": 0.8 * step / steps, "train/learning_rate": 1e-4})  # fmt: skip
    rows.append({"step": steps, "eval/loss": 0.61, "eval/accuracy": 0.66, "eval/margin": 0.5})
    return rows


def _rl_rows(steps: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "train/reward_mean": -0.2 + 0.5 * step / steps + rng.normal(0, 0.05),
                     "train/reward_std": 0.3, "train/kl": 0.8 * step / steps + abs(rng.normal(0, 0.02)),
                     "train/response_length": 40 + 12 * step / steps + rng.normal(0, 1.5),
                     "train/policy_loss": rng.normal(0, 0.1), "train/value_loss": 0.2 * math.exp(-step / 40),
                     "train/loss": rng.normal(0.05, 0.1), "train/entropy": 2.5, "train/grad_norm": 0.9,
                     "train/objective": 0.1, "train/learning_rate": 1e-5})  # fmt: skip
    return rows


def _samples(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        a = RL_REPLIES[i % len(RL_REPLIES)] + (" " + HOSTILE if i == 3 else "")
        b = SFT_REPLIES[i % len(SFT_REPLIES)]
        p_ab = float(np.clip(0.65 + rng.normal(0, 0.2), 0.02, 0.98))
        p_ba = float(np.clip(p_ab + rng.normal(0, 0.08), 0.02, 0.98))
        if i == 3:  # the hostile text is on the row the report shows first
            p_ab = p_ba = 0.99
        p = (p_ab + p_ba) / 2
        rows.append({"id": f"hh-harmless-{1300 + i}", "prompt": f"\n\nHuman: {PROMPTS[i % len(PROMPTS)]}\n\nAssistant:",
                     "response_a": a, "response_b": b, "p_a": p, "p_a_ab": p_ab, "p_a_ba": p_ba,
                     "outcome": 1.0 if (p_ab > 0.5) == (p_ba > 0.5) and p > 0.5 else 0.0 if p < 0.5 else 0.5,
                     "harmless_a": float(rng.uniform(-0.2, 0.8)), "harmless_b": float(rng.uniform(-0.5, 0.6)),
                     "len_a": len(a), "len_b": len(b)})  # fmt: skip
    return rows


def _eval_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    outcome = np.array([r["outcome"] for r in samples])
    len_a = np.array([r["len_a"] for r in samples], dtype=float)
    len_b = np.array([r["len_b"] for r in samples], dtype=float)
    rng = np.random.default_rng(0)
    means = outcome[rng.integers(0, len(outcome), (1000, len(outcome)))].mean(1)
    return {
        "a": {"name": "rlaif", "model": "runs/x/rl/model"}, "b": {"name": "sft", "model": "runs/x/sft/model"},
        "judge": {"backend": "embedding", "model": "packaged:all-MiniLM-L6-v2", "template_hash": "2cd5f7205d85"},
        "prompts": len(samples),
        "win_rate": {"value": float(outcome.mean()), "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
                     "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
                     "losses": int((outcome == 0).sum()), "n": len(samples)},
        "length_controlled_win_rate": {"value": 0.5813, "ci95": [0.4612, 0.6904], "coef_log_length_ratio": 0.91},
        "harmless_rate": {"a": {"value": 0.7, "ci95": [0.55, 0.825]}, "b": {"value": 0.55, "ci95": [0.4, 0.7]},
                          "threshold": 0.0, "judge": {"backend": "embedding"}},
        "length": {"a": {"mean_chars": float(len_a.mean()), "median_chars": float(np.median(len_a))},
                   "b": {"mean_chars": float(len_b.mean()), "median_chars": float(np.median(len_b))}},
        "order_agreement": 0.85,
    }  # fmt: skip


ALIGN = {
    "pairs": 600, "pairs_with_human_label": 598, "alignment": 0.5953, "alignment_ci95": [0.5736, 0.6171],
    "same_position_preferred": 0.0, "mean_p_first_slot": 0.5, "p_prefers_longer": 0.412,
    "human_p_prefers_longer": 0.4501, "ece": 0.0209, "mean_confidence": 0.5771, "judgments_from_cache": 0,
    "dataset": "hh-harmless:eval", "judge": "embedding-harmless", "labels": "elsewhere/align.labels.jsonl",
}  # fmt: skip

CONFIG = """name: report-test
model: builtin:hh-tiny-gpt
judge: embedding-harmless
policies:
  sft: {method: sft, init: base, data: hh-harmless:train}
  rlaif: {method: rl, init: sft, reward: reward_model}
eval:
  compare: [[rlaif, sft]]
"""


def make_run(
    root: Path, rl: bool = True, rm: bool = True, evaluation: bool = True, align: bool = True
) -> Path:
    """A run directory with the files the pipeline writes, following the run-directory contract."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(CONFIG, encoding="utf-8")
    stages: dict[str, Any] = {}
    _write_jsonl(root / "sft" / "metrics.jsonl", _sft_rows(60, rng))
    stages["sft"] = {"status": "done", "fingerprint": "ab" * 32, "inputs": {}, "outputs": ["sft"],
                     "output_hash": "cd" * 32, "started": 1.7e9, "seconds": 41.2, "summary": {"eval/loss": 2.13},
                     "error": None}  # fmt: skip
    if rm:
        _write_jsonl(root / "rm" / "metrics.jsonl", _rm_rows(40, rng))
        stages["reward_model"] = {**stages["sft"], "outputs": ["rm"], "seconds": 12.5, "summary": {}}
    if rl:
        rows = _rl_rows(100, rng)
        # a resumed run logs steps 51-55 again; a killed writer leaves half a line
        _write_jsonl(root / "rl" / "metrics.jsonl", rows[:55] + rows[50:], tail='{"step": 101, "train/rew')
        stages["rlaif"] = {
            **stages["sft"],
            "outputs": ["rl"],
            "status": "running",
            "seconds": None,
            "summary": {},
        }
    if evaluation:
        samples = _samples(40, rng)
        _write_jsonl(root / "eval" / "samples.jsonl", samples)
        (root / "eval" / "eval.json").write_text(json.dumps(_eval_summary(samples)), encoding="utf-8")
    if align:
        (root / "align.json").write_text(json.dumps(ALIGN), encoding="utf-8")
        labels = [{"id": f"hh-harmless-{1201 + i}", "p_a": float(p), "p_a_ab": float(p), "p_a_ba": float(p),
                   "human_label": float(rng.random() < p)} for i, p in enumerate(rng.uniform(0.2, 0.8, 200))]  # fmt: skip
        _write_jsonl(root / "align.labels.jsonl", labels)
    (root / "manifest.json").write_text(json.dumps({"stages": stages}), encoding="utf-8")
    return root


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "headless Chromium is needed to check that the report renders, and it is not installed: "
        "run `scripts/setup.sh --dev` (Debian: apt-get install chromium)"
    )


def _run_chromium(tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}", *args, page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env={"HOME": str(tmp)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow  # a browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    path = build_report(run)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    # self-contained: no external resource of any kind
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)
    assert "<link" not in text and "@import" not in text and "url(" not in text

    dom = _run_chromium(tmp_path, path, "--dump-dom").stdout
    body = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-images-decoded="(\d+)"', dom)
    assert body, dom[:500]
    images, decoded = int(body.group(1)), int(body.group(2))
    # sft, rm and rl curves, win-rate bars, length histograms, labeler plot: all decoded
    assert images == 6 and decoded == 6

    headline = re.search(r'<table class="headline">.*?</table>', dom, re.S)
    assert headline
    summary = json.loads((run / "eval" / "eval.json").read_text())
    table = headline.group(0)
    win = summary["win_rate"]
    assert f"{win['value']:.1%}" in table and f"[{win['ci95'][0]:.1%}, {win['ci95'][1]:.1%}]" in table
    assert "58.1%" in table and "[46.1%, 69.0%]" in table  # length-controlled
    assert "55.0%" in table and "70.0%" in table  # harmless before -> after
    assert f"{summary['length']['b']['mean_chars']:.0f}" in table
    assert "59.5%" in table and "[57.4%, 61.7%]" in table  # labeler alignment
    assert "not run" not in dom  # every stage had data
    assert dom.count('class="sample"') == 10
    # data text is escaped: shown as text, never run as markup
    assert "&lt;script&gt;alert('x')&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in dom
    assert "<script>alert" not in dom
    assert "status running" in dom  # the manifest's status of the RL stage

    shot = tmp_path / "report.png"
    _run_chromium(tmp_path, path, f"--screenshot={shot}", "--window-size=1200,2000")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2000, 1200)
    dark = (pixels.mean(-1) < 160).mean()  # text and plot lines
    blue = (pixels[..., 2] - pixels[..., 0] > 60).mean()  # the plots' and cards' blue
    assert dark > 0.01 and blue > 0.001, (
        f"the screenshot looks blank ({dark:.2%} dark, {blue:.2%} blue pixels)"
    )
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # anti-aliased text and plots, not flat colour


def test_missing_pieces_are_notes_not_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", rl=False, rm=False, evaluation=False, align=False)
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text("{ not json", encoding="utf-8")
    text = build_report(run, tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert text.count("<img") == 1  # the SFT curves only
    assert text.count('class="not-run">not run') == 2  # reward model, RL / DPO
    assert "eval/eval.json is missing" in text and "no align.json" in text
    assert "eval/eval.json: not readable JSON" in text
    assert "name: report-test" in text  # the config is shown


def test_resumed_metrics_keep_the_last_row_and_skip_a_torn_line(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    rl = next(t for t in run.trainers if t.folder == "rl")
    assert rl.kind == "rl" and rl.bad_lines == 1 and rl.status == "running"
    steps, values = rl.steps("train/kl")
    assert steps == [float(s) for s in range(1, 101)]
    assert [t.kind for t in run.trainers] == ["sft", "rm", "rl"]
    assert run.calibration is not None and int(run.calibration[2].sum()) == 200


def _dpo_rows(steps: int) -> list[dict[str, Any]]:
    return [{"step": step, "train/loss": 0.69 - 0.2 * step / steps, "train/accuracy": 0.5 + 0.3 * step / steps,
             "train/rewards/chosen": 0.1 * step / steps, "train/rewards/rejected": -0.1 * step / steps,
             "train/rewards/margin": 0.2 * step / steps, "train/logratio": 0.05 * step / steps}
            for step in range(1, steps + 1)]  # fmt: skip


def test_pipeline_layout_with_several_comparisons(tmp_path: Path) -> None:
    """The pipeline's layout: trainer folders named after the policies, one eval folder per
    compared pair; the manifest's order decides the main comparison."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    _write_jsonl(run / "sft" / "metrics.jsonl", _sft_rows(30, rng))
    _write_jsonl(run / "rlaif" / "metrics.jsonl", _rl_rows(30, rng))
    _write_jsonl(run / "dpo-pol" / "metrics.jsonl", _dpo_rows(30))
    _write_jsonl(run / "rlaif" / "checkpoint-10" / "metrics.jsonl", _rl_rows(5, rng))  # not a trainer folder
    stages = {}
    for name, a in (("rlaif", "rlaif"), ("dpo", "dpo-pol")):
        samples = _samples(12, rng)
        summary = _eval_summary(samples) | {"a": {"name": a}, "b": {"name": "sft"}}
        _write_jsonl(run / "eval" / f"{a}-vs-sft" / "samples.jsonl", samples)
        (run / "eval" / f"{a}-vs-sft" / "eval.json").write_text(json.dumps(summary), encoding="utf-8")
        stages[f"{name}:{a}"] = {"status": "done", "outputs": [a]}
    for a in ("rlaif", "dpo-pol"):  # config order: rlaif first, though "dpo-pol" sorts first
        stages[f"eval:{a}-vs-sft"] = {"status": "done", "outputs": [f"eval/{a}-vs-sft"]}
    stages["report"] = {"status": "running", "outputs": ["report.html"]}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}), encoding="utf-8")

    data = load_run(run)
    assert [(t.folder, t.kind) for t in data.trainers] == [
        ("sft", "sft"),
        ("rlaif", "rl"),
        ("dpo-pol", "dpo"),
    ]
    assert [c.path for c in data.comparisons] == [
        "eval/rlaif-vs-sft/eval.json",
        "eval/dpo-pol-vs-sft/eval.json",
    ]
    text = build_report(data).read_text(encoding="utf-8")
    assert "<td>rlaif vs sft</td>" in text and "<td>dpo-pol vs sft</td>" in text
    assert text.count("<img") == 5  # 3 trainers, win rates, lengths (no align.json)
    assert 'class="not-run">not run' in text  # the reward model
    assert ">report<" not in text  # the report's own, still running, stage is not listed


def test_pick_samples_spreads_over_the_soft_label() -> None:
    rows = [{"id": f"r{i}", "p_a": i / 100} for i in range(101)]
    picked = pick_samples(rows, 5)
    assert [r["p_a"] for r in picked] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert pick_samples(rows[:3], 5) == sorted(rows[:3], key=lambda r: -r["p_a"])


def test_summary_table_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    run = make_run(tmp_path / "run", rl=False, rm=False)
    console = Console(record=True, width=140)
    print_summary(run, console)
    out = console.export_text()
    win = json.loads((run / "eval" / "eval.json").read_text())["win_rate"]
    assert "rlaif vs sft" in out and f"{win['value']:.1%}" in out
    assert "55.0% → 70.0%" in out and "59.5%" in out
    verdict = "rlaif beats sft" if win["ci95"][0] > 0.5 else "rlaif does not"
    assert verdict in out

    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--quiet"]) == 0
    assert (tmp_path / "r.html").is_file() and f"report -> {tmp_path / 'r.html'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run directory" in capsys.readouterr().err


def test_rl_curves_include_the_judge_diagnostics_when_logged(tmp_path: Path) -> None:
    from openrlaif.evaluation.report.html import _panels_for

    rows = _rl_rows(10, np.random.default_rng(2))
    for row in rows:
        if row["step"] % 2 == 0:
            row |= {"judge/order_flip_rate": 0.1, "judge/decisiveness": 0.2, "judge/reward_length_corr": 0.3}
    _write_jsonl(tmp_path / "run" / "rl" / "metrics.jsonl", rows)
    rl = next(t for t in load_run(tmp_path / "run").trainers if t.folder == "rl")
    panels = {title: [key for key, _, _ in series] for title, series, _ in _panels_for(rl)}
    assert panels["Judge diagnostics"] == ["judge/order_flip_rate", "judge/decisiveness"]
    assert panels["Reward-length correlation"] == ["judge/reward_length_corr"]
    without = tmp_path / "plain"
    _write_jsonl(without / "rl" / "metrics.jsonl", _rl_rows(10, np.random.default_rng(2)))
    plain = next(t for t in load_run(without).trainers if t.folder == "rl")
    assert "Judge diagnostics" not in {title for title, _, _ in _panels_for(plain)}
