"""The run report: one self-contained HTML file per run directory, and the same headline
numbers as a table in the terminal.

`build_report(run_dir)` reads what the pipeline left in the run directory and writes
`report.html`: plots are PNG images inside the file (base64), the CSS is inline and there is no
external script or font, so the file opens anywhere without a network. Every piece is optional:
a run without RL, without an evaluation or without `align.json` gets a report without those
sections (a short note says what is missing), never an error. Every text taken from the data is
HTML-escaped.

What it reads (the run-directory contract, see the pipeline):
  config.yaml, manifest.json            shown as they are
  <stage>/metrics.jsonl                 training curves of every trainer folder (sft/, rm/, rl/,
                                        dpo/, or any folder holding a metrics.jsonl)
  eval/eval.json, eval/samples.jsonl    win rate, harmless rate, lengths, sample prompts
                                        (also eval/<comparison>/eval.json for several comparisons)
  align.json (+ its labels file)        the labeler against human labels
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlaif.data.io import write_text_atomic
from openrlaif.errors import OpenRLAIFError

REPORT_FILE = "report.html"
SAMPLE_PROMPTS = 10
MAX_DEPTH = 3  # how deep under the run directory trainer folders and evaluations are looked for

KIND_TITLES = {"sft": "Supervised fine-tuning", "rm": "Reward model", "rl": "RL", "dpo": "DPO"}

# Panels per trainer kind: (title, metric keys, key of a ± band around the first key). Keys come
# from the trainers' MetricsLogger rows ("train/..." per step, "eval/..." on held-out data).
PANELS: dict[str, list[tuple[str, list[str], str | None]]] = {
    "sft": [
        ("Loss", ["train/loss", "eval/loss"], None),
        ("Gradient norm", ["train/grad_norm"], None),
        ("Learning rate", ["train/learning_rate"], None),
    ],
    "rm": [
        ("Loss", ["train/loss", "eval/loss"], None),
        ("Accuracy", ["train/accuracy", "eval/accuracy", "eval/human_accuracy"], None),
        ("Reward margin", ["train/margin", "eval/margin"], None),
    ],
    "rl": [
        ("Reward", ["train/reward_mean"], "train/reward_std"),
        ("KL to the reference", ["train/kl"], None),
        ("Response length (tokens)", ["train/response_length"], None),
        ("Loss", ["train/loss", "train/policy_loss", "train/value_loss"], None),
    ],
    "dpo": [
        ("Loss", ["train/loss", "eval/loss"], None),
        ("Implicit reward margin", ["train/rewards/margin", "eval/rewards/margin"], None),
        ("Accuracy", ["train/accuracy", "eval/accuracy", "eval/human_accuracy"], None),
        ("Log-ratio to the reference", ["train/logratio", "eval/logratio"], None),
    ],
}


class ReportError(OpenRLAIFError):
    """The report cannot be made (no run directory there)."""


# ---------------------------------------------------------------- reading the run directory


@dataclass
class TrainerLog:
    """One trainer folder's metrics.jsonl: per key, step -> value (a resumed run logs some steps
    twice; the later row wins)."""

    folder: str  # relative to the run directory
    kind: str  # sft, rm, rl or dpo
    series: dict[str, dict[int, float]]
    bad_lines: int = 0
    status: str | None = None  # the manifest's status of the stage that wrote it

    def steps(self, key: str) -> tuple[list[float], list[float]]:
        points = sorted(self.series.get(key, {}).items())
        return [float(s) for s, _ in points], [v for _, v in points]

    def last(self, key: str) -> float | None:
        points = self.series.get(key)
        return points[max(points)] if points else None


@dataclass
class Comparison:
    """One evaluation: eval.json and its per-prompt rows."""

    path: str  # eval.json, relative to the run directory
    summary: dict[str, Any]
    samples: list[dict[str, Any]]

    @property
    def a(self) -> str:
        return str((self.summary.get("a") or {}).get("name") or "A")

    @property
    def b(self) -> str:
        return str((self.summary.get("b") or {}).get("name") or "B")


@dataclass
class RunData:
    root: Path
    config_text: str | None = None
    manifest: dict[str, Any] | None = None
    trainers: list[TrainerLog] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    align: dict[str, Any] | None = None
    calibration: Any = None  # (confidence, accuracy, counts) arrays from the labels file
    notes: list[str] = field(default_factory=list)  # files that were there but could not be read

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def primary(self) -> Comparison | None:
        return self.comparisons[0] if self.comparisons else None


def _read_json(path: Path, run: RunData) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.notes.append(f"{_rel(path, run.root)}: not readable JSON ({e}); left out")
        return None
    if not isinstance(data, dict):
        run.notes.append(f"{_rel(path, run.root)}: expected a JSON object; left out")
        return None
    return data


def _read_rows(path: Path, run: RunData) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSONL file; unreadable lines (e.g. the last line of a killed writer) are counted."""
    from openrlaif.data.io import iter_rows

    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        for _, row in iter_rows(path):
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    except OSError as e:
        run.notes.append(f"{_rel(path, run.root)}: not readable ({e}); left out")
    return rows, bad


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _walk(root: Path, filename: str) -> list[Path]:
    """Files named `filename` under root, at most MAX_DEPTH folders down, checkpoints skipped."""
    found = []
    for path in sorted(root.rglob(filename)):
        parts = path.relative_to(root).parts
        if len(parts) <= MAX_DEPTH + 1 and not any(p.startswith(("checkpoint", ".")) for p in parts[:-1]):
            found.append(path)
    return found


def _kind(keys: set[str]) -> str:
    if "train/reward_mean" in keys or "train/kl" in keys:
        return "rl"
    if "train/rewards/margin" in keys or "train/logratio" in keys:
        return "dpo"
    if "train/margin" in keys or "train/accuracy" in keys:
        return "rm"
    return "sft"


def _number(value: Any) -> float | None:
    """A finite number, else None (JSON null, NaN from an empty measure, text, booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _load_trainer(path: Path, run: RunData) -> TrainerLog:
    rows, bad = _read_rows(path, run)
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            bad += 1
            continue
        for key, value in row.items():
            number = _number(value)
            if key != "step" and number is not None:
                series.setdefault(key, {})[int(step)] = number
    return TrainerLog(_rel(path.parent, run.root), _kind(set(series)), series, bad)


def _stage_outputs(manifest: dict[str, Any] | None) -> dict[str, tuple[int, str]]:
    """Output path (a trainer folder, an eval folder) -> (the stage's position, its status)."""
    found: dict[str, tuple[int, str]] = {}
    for i, record in enumerate(_manifest_stages(manifest).values()):
        for output in record.get("outputs") or []:
            found[str(output).rstrip("/")] = (i, str(record.get("status")))
    return found


def _manifest_stages(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    stages = (manifest or {}).get("stages") or {}
    if isinstance(stages, list):  # tolerate a list of {"name": ...} records
        stages = {str(s.get("name", i)): s for i, s in enumerate(stages) if isinstance(s, dict)}
    return {str(k): v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


def _load_calibration(align: dict[str, Any], run: RunData, bins: int = 5) -> Any:
    """Reliability diagram points from the per-pair labels written next to align.json."""
    import numpy as np

    labels = align.get("labels")
    if not labels:
        return None
    path = Path(str(labels))
    if not path.is_file():
        path = run.root / path.name  # the run directory moved, or align ran from another folder
    if not path.is_file():
        return None
    rows, _ = _read_rows(path, run)
    pairs = [
        (float(r["p_a"]), float(r["human_label"]))
        for r in rows
        if _number(r.get("p_a")) is not None and _number(r.get("human_label")) not in (None, 0.5)
    ]
    if not pairs:
        return None
    p = np.array([x for x, _ in pairs])
    human = np.array([h for _, h in pairs])
    confidence = np.maximum(p, 1 - p)
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (human > 0.5)).astype(float))
    index = np.minimum(((confidence - 0.5) / 0.5 * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    keep = counts > 0
    mean_conf = np.bincount(index, weights=confidence, minlength=bins)[keep] / counts[keep]
    accuracy = np.bincount(index, weights=correct, minlength=bins)[keep] / counts[keep]
    return mean_conf, accuracy, counts[keep]


def load_run(run_dir: str | Path) -> RunData:
    """Everything the report shows, read from the run directory; what is missing stays None/empty."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    run = RunData(root)
    if (root / "config.yaml").is_file():
        run.config_text = (root / "config.yaml").read_text(encoding="utf-8", errors="replace")
    run.manifest = _read_json(root / "manifest.json", run)
    outputs = _stage_outputs(run.manifest)
    late = (len(outputs), "")  # not in the manifest: after the stages that are
    for path in _walk(root, "metrics.jsonl"):
        trainer = _load_trainer(path, run)
        trainer.status = outputs.get(trainer.folder, late)[1] or None
        run.trainers.append(trainer)
    order = list(KIND_TITLES)
    run.trainers.sort(key=lambda t: (order.index(t.kind), outputs.get(t.folder, late)[0], t.folder))
    # the main comparison first: eval/eval.json, else the pipeline's first (config order = manifest order)
    eval_files = _walk(root, "eval.json")
    eval_files.sort(
        key=lambda p: (p != root / "eval" / "eval.json", outputs.get(_rel(p.parent, root), late)[0], str(p))
    )
    for path in eval_files:
        summary = _read_json(path, run)
        if summary is None or "win_rate" not in summary:
            continue
        samples_path = path.with_name("samples.jsonl")
        samples = _read_rows(samples_path, run)[0] if samples_path.is_file() else []
        run.comparisons.append(Comparison(_rel(path, root), summary, samples))
    run.align = _read_json(root / "align.json", run)
    if run.align is not None:
        run.calibration = _load_calibration(run.align, run)
    if not (run.config_text or run.manifest or run.trainers or run.comparisons or run.align):
        raise ReportError(
            f"{run_dir}: not a run directory (no config.yaml, manifest.json, metrics.jsonl, eval/eval.json "
            "or align.json in it)"
        )
    return run


# ---------------------------------------------------------------- numbers as text


def _pct(value: Any, digits: int = 1) -> str:
    number = _number(value)
    return "—" if number is None or not math.isfinite(number) else f"{number:.{digits}%}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or any(_number(c) is None for c in ci):
        return ""
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _chars(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.0f}"


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _judge_name(identity: Any) -> str:
    if isinstance(identity, str):
        return identity
    if not isinstance(identity, dict):
        return "the judge"
    if identity.get("name"):
        return str(identity["name"])
    parts = [str(identity[k]) for k in ("backend", "model") if identity.get(k)]
    return ":".join(parts) or "the judge"


def verdict_parts(comparison: Comparison) -> tuple[str, str]:
    """The main result in plain words, (outcome, numbers); says so when the trained policy did not win."""
    a, b = comparison.a, comparison.b
    wr = comparison.summary.get("win_rate") or {}
    value, ci, n = _number(wr.get("value")), wr.get("ci95"), wr.get("n")
    if value is None:
        return f"No win rate was measured for {a} vs {b}.", ""
    judge = _judge_name(comparison.summary.get("judge"))
    outcome = {
        "good": f"{a} beats {b}.",
        "bad": f"{a} does not beat {b}: it loses.",
        "neutral": f"{a} does not clearly beat {b}: the 95% CI includes 50%.",
    }[_tone(ci)]
    interval = f" (95% CI {_pct(ci[0])} to {_pct(ci[1])})" if _ci(ci) else ""
    prompts = f" on {n} prompts" if n else ""
    return outcome, f"Win rate {_pct(value)}{interval}{prompts}, as judged by {judge}."


def verdict(comparison: Comparison) -> str:
    return " ".join(part for part in verdict_parts(comparison) if part)


@dataclass
class RewardModelCheck:
    """Did the reward model learn the labels it was trained on? Its held-out accuracy against
    the labels' argmax (pairs of prompts it never trained on), with a Wilson 95% interval."""

    folder: str
    accuracy: float
    pairs: int
    ci95: tuple[float, float]
    before: float | None  # the same accuracy before training (step 0)

    @property
    def learned(self) -> bool:
        return self.ci95[0] > 0.5

    def sentence(self) -> str:
        numbers = f"held-out accuracy {_pct(self.accuracy)} {_ci(self.ci95)} on {self.pairs} pairs"
        if self.learned:
            return f"The reward model ({self.folder}/) learned the labels: {numbers}."
        return (
            f"The reward model ({self.folder}/) did not learn the labels: {numbers}, not clearly above "
            "chance. RL against it follows noise, not the judge; more or clearer feedback pairs, or more "
            "reward-model steps, are needed."
        )


def check_reward_model(
    folder: str, accuracy: float | None, pairs: float | None, before: float | None = None
) -> RewardModelCheck | None:
    """None when the numbers are not there (no held-out pairs)."""
    from openrlaif.evaluation.winrate import proportion_ci

    if accuracy is None or not pairs or not math.isfinite(accuracy):
        return None
    n = int(pairs)
    return RewardModelCheck(folder, accuracy, n, proportion_ci(accuracy * n, n), before)


def reward_model_check(trainer: TrainerLog) -> RewardModelCheck | None:
    """From a reward-model trainer's metrics: the last held-out accuracy and its pair count."""
    if trainer.kind != "rm":
        return None
    steps, values = trainer.steps("eval/accuracy")
    before = values[0] if steps and steps[0] == 0 else None
    return check_reward_model(
        trainer.folder, trainer.last("eval/accuracy"), trainer.last("eval/pairs"), before
    )


def reward_model_checks(run: RunData) -> list[RewardModelCheck]:
    return [c for t in run.trainers if (c := reward_model_check(t)) is not None]


# ---------------------------------------------------------------- HTML pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: tuple[bytes, int], alt: str) -> str:
    data, width = png
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{encoded}" width="{width}" alt="{_e(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(anchor: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{lead_html}{body}</section>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape data before passing it)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(label: str, value: str, sub: str, tone: str = "") -> str:
    return (
        f'<div class="card {tone}"><div class="card-label">{_e(label)}</div>'
        f'<div class="card-value">{_e(value)}</div><div class="card-sub">{_e(sub)}</div></div>'
    )


def _tone(ci: Any) -> str:
    """good: the whole 95% CI is above 50%; bad: below; neutral: it includes 50% (or is unknown)."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(c) is not None for c in ci):
        return "good" if ci[0] > 0.5 else "bad" if ci[1] < 0.5 else "neutral"
    return "neutral"


# ---------------------------------------------------------------- sections


def section_header(run: RunData) -> str:
    main = run.primary
    if main is not None:
        outcome, numbers = verdict_parts(main)
        sentence = f"<b>{_e(outcome)}</b> {_e(numbers)}"
    else:
        sentence = "No evaluation in this run yet (eval/eval.json is missing)."
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    others = "".join(
        f'<p class="verdict {_tone(_get(c.summary, "win_rate", "ci95"))}">{_e(verdict(c))}</p>'
        for c in run.comparisons[1:]
    )
    warnings = "".join(
        f'<p class="verdict bad">{_e(check.sentence())}</p>'
        for check in reward_model_checks(run)
        if not check.learned
    )
    return (
        f'<header><div class="kicker">openrlaif run report</div><h1>{_e(run.name)}</h1>'
        f'<p class="meta">{_e(run.root.resolve())} · generated {_e(when)}</p>'
        f'<p class="verdict {_tone(_get(main.summary, "win_rate", "ci95")) if main else "neutral"}">'
        f"{sentence}</p>{others}{warnings}</header>"
    )


def _headline_cards(run: RunData) -> list[str]:
    cards = []
    if (main := run.primary) is not None:
        wr, lc = main.summary.get("win_rate") or {}, main.summary.get("length_controlled_win_rate") or {}
        harmless, length = main.summary.get("harmless_rate") or {}, main.summary.get("length") or {}
        cards.append(
            _card(
                f"Win rate {main.a} over {main.b}",
                _pct(wr.get("value")),
                _ci(wr.get("ci95")),
                _tone(wr.get("ci95")),
            )
        )
        lc_sub = _ci(lc.get("ci95")) or "at equal length"
        cards.append(
            _card("Length-controlled win rate", _pct(lc.get("value")), lc_sub, _tone(lc.get("ci95")))
        )
        if harmless:
            before = f"{main.b}: {_pct(_get(harmless, 'b', 'value'))}"
            cards.append(_card(f"Harmless rate, {main.a}", _pct(_get(harmless, "a", "value")), before))
        if length:
            before = f"{main.b}: {_chars(_get(length, 'b', 'mean_chars'))}"
            cards.append(
                _card(f"Mean length, {main.a}", _chars(_get(length, "a", "mean_chars")) + " chars", before)
            )
    if run.align and _number(run.align.get("alignment")) is not None:
        alignment = run.align["alignment"]
        cards.append(_card("Labeler alignment", _pct(alignment), _ci(run.align.get("alignment_ci95"))))
    return cards


@dataclass
class Measure:
    """One row of the headline table (the same rows in the HTML report and the terminal)."""

    group: str  # "rlaif vs sft", "labeler vs humans"
    name: str
    value: str
    ci: str
    detail: str
    lead: bool = False  # one of the numbers the report leads with (bold)


def _comparison_measures(c: Comparison) -> list[Measure]:
    s, group = c.summary, f"{c.a} vs {c.b}"
    wr, lc = s.get("win_rate") or {}, s.get("length_controlled_win_rate") or {}
    counts = " / ".join(str(wr.get(k, "—")) for k in ("wins", "ties", "losses"))
    coef = _number(lc.get("coef_log_length_ratio"))
    rows = [
        Measure(group, "win rate", _pct(wr.get("value")), _ci(wr.get("ci95")),
                f"wins / ties / losses {counts} of {wr.get('n', '—')}", lead=True),
        Measure(group, "length-controlled win rate", _pct(lc.get("value")), _ci(lc.get("ci95")),
                "at equal length" + (f"; length coefficient {coef:+.2f}" if coef is not None else ""), lead=True),
    ]  # fmt: skip
    if harmless := s.get("harmless_rate"):
        threshold = _number(_get(harmless, "threshold"))
        rows.append(Measure(
            group, "harmless rate", f"{_pct(_get(harmless, 'b', 'value'))} → {_pct(_get(harmless, 'a', 'value'))}",
            f"{_ci(_get(harmless, 'b', 'ci95'))} → {_ci(_get(harmless, 'a', 'ci95'))}",
            f"{c.b} → {c.a}" + (f"; judge score above {threshold:g}" if threshold is not None else ""), lead=True,
        ))  # fmt: skip
    if length := s.get("length"):
        rows.append(Measure(
            group, "mean length (chars)",
            f"{_chars(_get(length, 'b', 'mean_chars'))} → {_chars(_get(length, 'a', 'mean_chars'))}",
            f"median {_chars(_get(length, 'b', 'median_chars'))} → {_chars(_get(length, 'a', 'median_chars'))}",
            f"{c.b} → {c.a}", lead=True,
        ))  # fmt: skip
    if distinct := s.get("distinct_responses"):
        rows.append(Measure(
            group, "distinct responses", f"{_pct(_get(distinct, 'b'))} → {_pct(_get(distinct, 'a'))}", "",
            f"{c.b} → {c.a}; share of prompts with an answer of their own (low: collapsed onto one answer)",
        ))  # fmt: skip
    if _number(s.get("order_agreement")) is not None:
        rows.append(Measure(group, "judge order agreement", _pct(s["order_agreement"]), "",
                            "the same winner with the responses in either order"))  # fmt: skip
    return rows


def _align_measures(a: dict[str, Any]) -> list[Measure]:
    group = "labeler vs humans"
    return [
        Measure(group, "alignment", _pct(a.get("alignment")), _ci(a.get("alignment_ci95")),
                f"{a.get('pairs_with_human_label', '—')} human-labeled pairs of {a.get('dataset', 'the data')}",
                lead=True),
        Measure(group, "position bias", _pct(a.get("same_position_preferred")), "",
                f"same slot preferred in both orders; mean P(first slot) {_pct(a.get('mean_p_first_slot'))}"),
        Measure(group, "length bias", _pct(a.get("p_prefers_longer")), "",
                f"P(prefers the longer response); humans {_pct(a.get('human_p_prefers_longer'))}"),
    ]  # fmt: skip


def _reward_model_measures(check: RewardModelCheck) -> list[Measure]:
    before = f"; before training {_pct(check.before)}" if check.before is not None else ""
    verdict_ = "learned" if check.learned else "did not learn (CI includes 50%)"
    return [
        Measure(f"reward model {check.folder}/", "held-out accuracy", _pct(check.accuracy),
                _ci(check.ci95), f"vs the AI labels of {check.pairs} pairs of held-out prompts{before}; {verdict_}", lead=True),
    ]  # fmt: skip


def headline_measures(run: RunData) -> list[Measure]:
    rows = [m for c in run.comparisons for m in _comparison_measures(c)]
    rows += [m for check in reward_model_checks(run) for m in _reward_model_measures(check)]
    return rows + (_align_measures(run.align) if run.align else [])


def section_headline(run: RunData) -> str:
    cards, measures = _headline_cards(run), headline_measures(run)
    if not cards and not measures:
        return _section("headline", "Headline", _note("No evaluation and no labeler alignment in this run."))
    rows, group = [], None
    for m in measures:
        value = f"<b>{_e(m.value)}</b>" if m.lead else _e(m.value)
        rows.append([_e(m.group) if m.group != group else "", _e(m.name), value, _e(m.ci), _e(m.detail)])
        group = m.group
    table = _table(["comparison", "measure", "value", "95% CI", "detail"], rows, "headline")
    notes = "" if run.comparisons else _note("No evaluation in this run (eval/eval.json is missing).")
    if not run.align:
        notes += _note("The labeler was not measured on human labels (align.json is missing).")
    return _section("headline", "Headline", f'<div class="cards">{"".join(cards)}</div>{table}{notes}')


def _panels_for(trainer: TrainerLog) -> list[tuple[str, list[tuple[str, list[float], list[float]]], Any]]:
    """The panels of one trainer that have data; a series equal to one already drawn, or all
    zero (e.g. the value loss of RLOO), is left out."""
    panels = []
    for title, keys, band_key in PANELS[trainer.kind]:
        series: list[tuple[str, list[float], list[float]]] = []
        for key in keys:
            steps, values = trainer.steps(key)
            if not steps or all(v == 0 for v in values) or any(values == s[2] for s in series):
                continue
            series.append((key, steps, values))
        if series:
            band = (band_key, *trainer.steps(band_key)) if band_key and band_key in trainer.series else None
            panels.append((title, series, band))
    return panels


def _trainer_facts(trainer: TrainerLog) -> str:
    steps = max((max(v) for v in trainer.series.values() if v), default=0)
    facts = [f"{steps} steps logged"]
    for key, label in (("train/loss", "final loss"), ("eval/loss", "held-out loss"),
                       ("eval/accuracy", "held-out accuracy"), ("train/reward_mean", "final reward"),
                       ("train/kl", "final KL")):  # fmt: skip
        value = trainer.last(key)
        if value is not None:
            facts.append(f"{label} {_pct(value) if 'accuracy' in key else f'{value:.4g}'}")
    if trainer.status and trainer.status != "done":
        facts.append(f"stage status: {trainer.status}")
    if trainer.bad_lines:
        facts.append(f"{trainer.bad_lines} unreadable line(s) skipped")
    return " · ".join(facts)


def _trainer_block(trainer: TrainerLog) -> str:
    from openrlaif.evaluation import report_plots

    title = f"{KIND_TITLES[trainer.kind]} — {trainer.folder}/"
    panels = _panels_for(trainer)
    if panels:
        body = _img(report_plots.training_curves(panels), f"{title} training curves")
    else:
        body = _note("no metrics logged yet")
    return f'<div class="stage"><h3>{_e(title)}</h3><p class="facts">{_e(_trainer_facts(trainer))}</p>{body}</div>'


def _not_run(title: str) -> str:
    return f'<div class="stage"><h3>{_e(title)}</h3><p class="not-run">not run</p></div>'


def section_training(run: RunData) -> str:
    """Every trainer folder's curves, in pipeline order (SFT, reward model, RL, DPO); SFT, the
    reward model and policy optimisation (RL or DPO) say "not run" when they have no data."""
    blocks = []
    kinds = {t.kind for t in run.trainers}
    for kind in KIND_TITLES:
        blocks += [_trainer_block(t) for t in run.trainers if t.kind == kind]
        if kind in ("sft", "rm") and kind not in kinds:
            blocks.append(_not_run(KIND_TITLES[kind]))
    if not kinds & {"rl", "dpo"}:
        blocks.append(_not_run("RL / DPO"))
    lead = "Per logged step; held-out points in orange. Noisy curves are smoothed (raw steps faint)."
    return _section("training", "Training curves", "".join(blocks), lead)


def _estimate(d: Any) -> tuple[float, tuple[float, float] | None] | None:
    value = _number(_get(d, "value"))
    if value is None:
        return None
    ci = _get(d, "ci95")
    ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(c) is not None for c in ci)
    return value, (float(ci[0]), float(ci[1])) if ok else None


def section_win_rates(run: RunData) -> str:
    from openrlaif.evaluation import report_plots

    main = run.primary
    if main is None:
        return _section(
            "win-rate", "Win rate", _note("No evaluation in this run (eval/eval.json is missing).")
        )
    rates = []
    harmless: dict[str, Any] = {}  # policy -> its harmless rate (first comparison that measured it)
    for c in run.comparisons:
        prefix = f"{c.a} vs {c.b}: " if len(run.comparisons) > 1 else ""
        for key, label in (("win_rate", "win rate"), ("length_controlled_win_rate", "length-controlled")):
            if (est := _estimate(c.summary.get(key))) is not None:
                rates.append((prefix + label, est))
        for side, name in (("b", c.b), ("a", c.a)):
            if (est := _estimate(_get(c.summary, "harmless_rate", side))) is not None:
                harmless.setdefault(name, est)
    if not rates:
        return _section("win-rate", "Win rate", _note("The evaluation has no win rate."))
    png = report_plots.win_rates(rates, list(harmless.items()), main.a, main.b)
    lead = (
        f"How often the judge prefers {_e(main.a)}'s response to {_e(main.b)}'s on the same prompt: each pair is "
        "judged in both orders, a tie counts ½, bars show 95% bootstrap intervals. The length-controlled rate "
        "is a logistic regression of the outcome on the log length ratio, read at equal length. The harmless "
        "rate is the share of responses the judge rates harmless, each judged alone."
    )
    return _section("win-rate", "Win rate", _img(png, "win rate bars with 95% CI"), lead)


def section_lengths(run: RunData) -> str:
    from openrlaif.evaluation import report_plots

    main = run.primary
    if main is None or not main.samples:
        return _section(
            "lengths", "Response length", _note("No per-prompt samples (eval/samples.jsonl is missing).")
        )
    rows = [
        r for r in main.samples if _number(r.get("len_a")) is not None and _number(r.get("len_b")) is not None
    ]
    if not rows:
        return _section("lengths", "Response length", _note("The samples carry no lengths."))
    p_a = [float(r["p_a"]) for r in rows] if all(_number(r.get("p_a")) is not None for r in rows) else None
    png = report_plots.length_distributions(
        [r["len_b"] for r in rows], [r["len_a"] for r in rows], p_a, (main.a, main.b)
    )
    which = f" ({_e(main.a)} vs {_e(main.b)})" if len(run.comparisons) > 1 else ""
    lead = (
        f"Characters per response on the {len(rows)} evaluation prompts{which}. RLAIF policies tend to get "
        "longer; the right panel shows whether the judge rewards length."
    )
    return _section("lengths", "Response length", _img(png, "response length histograms"), lead)


def section_labeler(run: RunData) -> str:
    from openrlaif.evaluation import report_plots

    a = run.align
    if not a:
        return _section(
            "labeler", "AI labeler", _note("The labeler was not measured on human labels (no align.json).")
        )
    png = report_plots.labeler_bias(a, run.calibration)
    ece = _number(a.get("ece"))
    rows = [
        ["alignment with human labels", f"<b>{_pct(a.get('alignment'))}</b> {_e(_ci(a.get('alignment_ci95')))}",
         "argmax of the soft label = the human's choice (95% bootstrap CI)"],
        ["same position preferred", _pct(a.get("same_position_preferred")),
         "picks the same slot in both orders (position bias; 0% = none)"],
        ["mean P(first slot)", _pct(a.get("mean_p_first_slot")), "50% = no preference for the first slot"],
        ["P(prefers longer)", _pct(a.get("p_prefers_longer")),
         f"humans: {_pct(a.get('human_p_prefers_longer'))} (length bias)"],
        ["calibration error (ECE)", "—" if ece is None else f"{ece:.3f}", "0 = confidence matches accuracy"],
        ["mean confidence", _pct(a.get("mean_confidence")), "mean max(p, 1-p)"],
    ]  # fmt: skip
    judge = a.get("judge") or _judge_name(a.get("judge_identity"))
    lead = (
        f"{_e(judge)} labeled {_e(a.get('pairs', '—'))} pairs of {_e(a.get('dataset', 'the data'))} in both orders; "
        "its soft labels are compared with the human labels."
    )
    body = _img(png, "labeler alignment and bias") + _table(
        ["measure", "value", "what it means"], rows, "compact"
    )
    if run.calibration is None:
        body += _note("Calibration plot left out: the per-pair labels file named in align.json is not there.")
    return _section("labeler", "AI labeler vs human labels", body, lead)


def pick_samples(samples: list[dict[str, Any]], count: int = SAMPLE_PROMPTS) -> list[dict[str, Any]]:
    """`count` rows spread evenly over the judge's soft label, from the trained policy's clearest
    win to its clearest loss (deterministic: sorted by p_a, then id)."""
    rows = [r for r in samples if _number(r.get("p_a")) is not None]
    rows.sort(key=lambda r: (-float(r["p_a"]), str(r.get("id", ""))))
    if len(rows) <= count:
        return rows
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)]


def _response(label: str, text: Any, score: Any, length: Any, winner: bool, tone: str) -> str:
    score_n = _number(score)
    meta = [f"{_chars(length)} chars"] + ([f"harmless score {score_n:+.2f}"] if score_n is not None else [])
    badge = '<span class="badge">judge prefers</span>' if winner else ""
    return (
        f'<div class="response {tone}{" winner" if winner else ""}"><div class="who">{_e(label)}{badge}</div>'
        f'<div class="text">{_e(str(text or "").strip())}</div><div class="small">{_e(" · ".join(meta))}</div></div>'
    )


def _dialogue(prompt: Any) -> str:
    """An HH-style prompt (turns "Human: ..." / "Assistant: ...") with bold speakers; escaped."""
    text = re.sub(r"\n*Assistant:\s*$", "", str(prompt or "").strip()).strip()  # the turn being answered
    text = re.sub(r"\n\n(?=(Human|Assistant):)", "\n", _e(text))
    return re.sub(r"(^|\n)(Human|Assistant):", r"\1<b>\2:</b>", text)


def section_samples(run: RunData) -> str:
    main = run.primary
    title = "Sample prompts"
    if main is None or not main.samples:
        return _section("samples", title, _note("No per-prompt samples (eval/samples.jsonl is missing)."))
    picked = pick_samples(main.samples)
    if not picked:
        return _section("samples", title, _note("The samples carry no soft labels."))
    cards = []
    for i, r in enumerate(picked, 1):
        p = float(r["p_a"])
        orders = ""
        if _number(r.get("p_a_ab")) is not None and _number(r.get("p_a_ba")) is not None:
            orders = f" (shown first: {_pct(r['p_a_ab'], 0)}, shown second: {_pct(r['p_a_ba'], 0)})"
        label = (
            f'<div class="softlabel"><div class="bar"><span style="width:{100 * p:.1f}%"></span></div>'
            f"<div>judge: P({_e(main.a)} better) = <b>{_pct(p, 0)}</b>{_e(orders)}</div></div>"
        )
        left = _response(
            main.b, r.get("response_b"), r.get("harmless_b"), r.get("len_b"), p < 0.5, "baseline"
        )
        right = _response(
            main.a, r.get("response_a"), r.get("harmless_a"), r.get("len_a"), p > 0.5, "trained"
        )
        cards.append(
            f'<article class="sample"><div class="sample-head"><span class="num">{i}</span>'
            f'<span class="id">{_e(r.get("id", ""))}</span>{label}</div>'
            f'<div class="prompt">{_dialogue(r.get("prompt", ""))}</div><div class="pair">{left}{right}</div></article>'
        )
    lead = (
        f"{len(picked)} of {len(main.samples)} evaluation prompts, spread evenly over the judge's soft label "
        f"from {_e(main.a)}'s clearest win to its clearest loss; {_e(main.b)} on the left, {_e(main.a)} on the right."
    )
    return _section("samples", title, "".join(cards), lead)


def section_run(run: RunData) -> str:
    parts = []
    stages = _manifest_stages(run.manifest)
    if stages:
        rows = []
        for name, record in stages.items():
            if record.get("outputs") == [REPORT_FILE]:
                continue  # this report itself, still being written
            status = str(record.get("status", "—"))
            seconds = _number(record.get("seconds"))
            summary = record.get("summary") or {}
            detail = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                               if isinstance(v, int | float | str))  # fmt: skip
            if record.get("error"):
                detail = f"error: {record['error']}"
            outputs = ", ".join(str(o) for o in record.get("outputs") or [])
            rows.append([_e(name), f'<span class="status {_e(status)}">{_e(status)}</span>',
                         "—" if seconds is None else f"{seconds:.1f} s", _e(outputs), _e(detail)])  # fmt: skip
        parts.append(
            "<h3>Stages (manifest.json)</h3>"
            + _table(["stage", "status", "time", "outputs", "summary"], rows, "compact")
        )
    else:
        parts.append(_note("No manifest.json: stage statuses unknown."))
    if run.config_text is not None:
        parts.append(f'<h3>Config (config.yaml)</h3><pre class="config">{_e(run.config_text)}</pre>')
    else:
        parts.append(_note("No config.yaml in the run directory."))
    if run.notes:
        parts.append(
            "<h3>Files left out</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in run.notes) + "</ul>"
        )
    return _section("run", "Run", "".join(parts))


# ---------------------------------------------------------------- the page

CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --blue:#2563eb; --slate:#94a3b8;
  --good:#15803d; --bad:#b91c1c; --neutral:#92400e; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.5; font-size:15px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "Liberation Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1060px; margin: 0 auto; padding: 28px 24px 64px; }
header { padding: 8px 0 4px; }
.kicker { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; color: var(--muted); font-weight: 600; }
h1 { font-size: 30px; margin: 2px 0 2px; letter-spacing: -.01em; }
.meta { color: var(--muted); font-size: 13px; margin: 0 0 14px; word-break: break-all; }
.verdict { font-size: 17px; padding: 12px 16px; border-radius: 10px; background: #fff; border-left: 5px solid var(--neutral); margin: 0; }
.verdict.good { border-color: var(--good); } .verdict.bad { border-color: var(--bad); }
nav { display:flex; gap: 18px; flex-wrap: wrap; font-size: 14px; margin: 18px 0 4px; }
nav a { color: var(--blue); text-decoration: none; } nav a:hover { text-decoration: underline; }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 20px 24px 24px; margin: 18px 0; }
h2 { font-size: 20px; margin: 0 0 6px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.lead { color: var(--muted); margin: 0 0 12px; font-size: 14px; }
.note { color: var(--muted); font-style: italic; margin: 8px 0; }
.not-run { display:inline-block; color: var(--muted); background: var(--bg); border: 1px dashed #cbd5e1;
  border-radius: 6px; padding: 2px 10px; margin: 2px 0 6px; font-size: 13px; }
.facts { color: var(--muted); font-size: 13px; margin: 0 0 6px; }
img.plot { display:block; max-width: 100%; height: auto; margin: 6px 0 4px; }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 12px; margin: 8px 0 18px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; background: #fbfbfc; border-top: 4px solid var(--slate); }
.card.good { border-top-color: var(--good); } .card.bad { border-top-color: var(--bad); } .card.neutral { border-top-color: #d97706; }
.card-label { font-size: 12.5px; color: var(--muted); }
.card-value { font-size: 28px; font-weight: 650; letter-spacing: -.01em; font-variant-numeric: tabular-nums; }
.card-sub { font-size: 12.5px; color: var(--muted); font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin: 6px 0; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12.5px; border-bottom: 2px solid var(--line); padding: 6px 10px; }
td { border-bottom: 1px solid var(--line); padding: 6px 10px; vertical-align: top; font-variant-numeric: tabular-nums; }
table.headline td:nth-child(3) { white-space: nowrap; }
table.headline td:first-child { font-weight: 600; }
table.compact td:first-child { white-space: nowrap; }
.status { padding: 1px 8px; border-radius: 999px; font-size: 12px; background: #eef2f7; }
.status.done { background: #dcfce7; color: #166534; } .status.failed { background: #fee2e2; color: #991b1b; }
.status.running { background: #fef3c7; color: #92400e; }
pre.config { background: #0f172a; color: #e2e8f0; padding: 14px 16px; border-radius: 8px; font-size: 12.5px;
  max-height: 420px; overflow: auto; line-height: 1.45; }
.sample { border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; margin: 12px 0; }
.sample-head { display:flex; align-items:center; gap: 12px; flex-wrap: wrap; font-size: 13px; color: var(--muted); }
.num { background: var(--ink); color: #fff; border-radius: 999px; width: 22px; height: 22px; display:inline-flex;
  align-items:center; justify-content:center; font-size: 12px; font-weight: 600; }
.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.softlabel { display:flex; align-items:center; gap: 8px; margin-left:auto; }
.bar { width: 120px; height: 8px; border-radius: 4px; background: var(--slate); overflow: hidden; }
.bar span { display:block; height: 100%; background: var(--blue); }
.prompt { white-space: pre-wrap; background: var(--bg); border-radius: 8px; padding: 8px 12px; margin: 10px 0;
  font-size: 13.5px; max-height: 180px; overflow: auto; }
.pair { display:grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.response { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; border-top: 3px solid var(--slate); }
.response.trained { border-top-color: var(--blue); }
.response.winner { box-shadow: 0 0 0 2px #bfdbfe; }
.who { font-weight: 600; font-size: 13px; margin-bottom: 4px; }
.badge { margin-left: 8px; font-size: 11px; font-weight: 600; color: var(--good); background: #dcfce7; border-radius: 999px; padding: 1px 7px; }
.text { white-space: pre-wrap; font-size: 14px; }
.small { color: var(--muted); font-size: 12px; margin-top: 6px; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; margin-top: 24px; }
@media (max-width: 720px) { .pair { grid-template-columns: 1fr; } }
"""

# Counts the decoded plots once the page has loaded (a render check reads it from the DOM).
ONLOAD = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-decoded",
    String(images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length));
});
"""

SECTIONS = [
    ("headline", "Headline", section_headline),
    ("training", "Training", section_training),
    ("win-rate", "Win rate", section_win_rates),
    ("lengths", "Length", section_lengths),
    ("labeler", "Labeler", section_labeler),
    ("samples", "Samples", section_samples),
    ("run", "Run", section_run),
]


def render_html(run: RunData) -> str:
    nav = "".join(f'<a href="#{anchor}">{_e(label)}</a>' for anchor, label, _ in SECTIONS)
    body = "".join(build(run) for _, _, build in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(run.name)} · openrlaif report</title><style>{CSS}</style></head>"
        f'<body data-images="0" data-images-decoded="0"><main>{section_header(run)}<nav>{nav}</nav>{body}'
        "<footer>Made by <code>openrlaif report</code>. Self-contained: plots are embedded, nothing is loaded "
        f"from the network.</footer></main><script>{ONLOAD}</script></body></html>\n"
    )


def build_report(run_dir: str | Path | RunData, out: str | Path | None = None) -> Path:
    """Write the run's HTML report (default: <run_dir>/report.html) and return its path."""
    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    path = Path(out) if out is not None else run.root / REPORT_FILE
    write_text_atomic(path, render_html(run))  # a reader never sees half a report
    return path


# ---------------------------------------------------------------- the terminal


def print_summary(run_dir: str | Path | RunData, console: Any = None) -> None:
    """The headline numbers as a rich table, and the verdict in one sentence."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    console = console or Console()
    table = Table(title=f"openrlaif run: {run.name}", header_style="bold", title_style="bold")
    wide = console.width >= 120  # the detail column only where it fits without wrapping everything
    for column, justify in (("measure", "left"), ("value", "right"), ("95% CI", "left"), ("detail", "left"))[
        : 4 if wide else 3
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    group = None
    for m in headline_measures(run):
        if m.group != group:
            table.add_row(Text(m.group, style="bold"))
            group = m.group
        cells = [
            Text("  " + m.name),
            Text(m.value, style="bold" if m.lead else ""),
            Text(m.ci),
            Text(m.detail),
        ]
        table.add_row(*cells[: 4 if wide else 3])
    for trainer in run.trainers:  # where RL ended (the curves are in the HTML report)
        for key, label in (("train/reward_mean", "final reward"), ("train/kl", "final KL")):
            if (value := trainer.last(key)) is not None:
                table.add_row(Text(f"{label} ({trainer.folder}/)"), Text(f"{value:.4g}"))
    console.print(table)
    for check in reward_model_checks(run):
        console.print(Text(check.sentence(), style="" if check.learned else "bold red"))
    if not run.comparisons:
        console.print(Text("No evaluation in this run yet (eval/eval.json is missing).", style="bold"))
    for comparison in run.comparisons:
        console.print(Text(verdict(comparison), style="bold"))


# ---------------------------------------------------------------- the command line


def add_report_command(sub: Any) -> None:
    p = sub.add_parser("report", help="write a run's self-contained HTML report (plots, tables, samples)")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--out", default=None, help="HTML file to write (default: <run_dir>/report.html)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")


def cmd_report(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    path = build_report(run, args.out)
    if not args.quiet:
        print_summary(run)
    print(f"report -> {path}")
    return 0
