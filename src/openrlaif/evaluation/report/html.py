"""The run report as one self-contained HTML file.

`build_report(run_dir)` writes `report.html`: plots are PNG images inside the file (base64), the
CSS (report.css, shipped with the package) is inline and there is no external script or font, so
the file opens anywhere without a network. Every piece is optional: a run without RL, without an
evaluation or without `align.json` gets a report without those sections (a short note says what
is missing), never an error. Every text taken from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from openrlaif.data.chat import prompt_text
from openrlaif.data.io import write_text_atomic
from openrlaif.data.records import prompt_from_json
from openrlaif.evaluation.report import plots
from openrlaif.evaluation.report.headline import headline_measures
from openrlaif.evaluation.report.load import KIND_TITLES, RunData, TrainerLog, load_run, manifest_stages
from openrlaif.evaluation.report.reward_model import reward_model_checks
from openrlaif.evaluation.report.text import chars, ci_text, finite, judge_name, lookup, pct
from openrlaif.evaluation.report.verdict import ci_tone, verdict

REPORT_FILE = "report.html"


SAMPLE_PROMPTS = 10

CSS = files(__package__).joinpath("report.css").read_text(encoding="utf-8")

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
        ("Judge diagnostics", ["judge/gold_agreement", "judge/order_flip_rate", "judge/decisiveness"], None),
        ("Reward-length correlation", ["judge/reward_length_corr"], None),
    ],
    "dpo": [
        ("Loss", ["train/loss", "eval/loss"], None),
        ("Implicit reward margin", ["train/rewards/margin", "eval/rewards/margin"], None),
        ("Accuracy", ["train/accuracy", "eval/accuracy", "eval/human_accuracy"], None),
        ("Log-ratio to the reference", ["train/logratio", "eval/logratio"], None),
    ],
}


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


# ---------------------------------------------------------------- sections


def section_header(run: RunData) -> str:
    main = run.primary
    main_verdict = verdict(main.summary) if main is not None else None
    if main_verdict is not None:
        sentence = f"<b>{_e(main_verdict.outcome)}</b> {_e(main_verdict.numbers)}"
    else:
        sentence = "No evaluation in this run yet (eval/eval.json is missing)."
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    others = "".join(
        f'<p class="verdict {v.tone}">{_e(v)}</p>' for v in (verdict(c.summary) for c in run.comparisons[1:])
    )
    warnings = "".join(
        f'<p class="verdict bad">{_e(check.sentence())}</p>'
        for check in reward_model_checks(run)
        if not check.learned
    )
    return (
        f'<header><div class="kicker">openrlaif run report</div><h1>{_e(run.name)}</h1>'
        f'<p class="meta">{_e(run.root.resolve())} · generated {_e(when)}</p>'
        f'<p class="verdict {main_verdict.tone if main_verdict else "neutral"}">'
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
                pct(wr.get("value")),
                ci_text(wr.get("ci95")),
                ci_tone(wr.get("ci95")),
            )
        )
        lc_sub = ci_text(lc.get("ci95")) or "at equal length"
        cards.append(
            _card("Length-controlled win rate", pct(lc.get("value")), lc_sub, ci_tone(lc.get("ci95")))
        )
        if harmless:
            before = f"{main.b}: {pct(lookup(harmless, 'b', 'value'))}"
            cards.append(_card(f"Harmless rate, {main.a}", pct(lookup(harmless, "a", "value")), before))
        if length:
            before = f"{main.b}: {chars(lookup(length, 'b', 'mean_chars'))}"
            cards.append(
                _card(f"Mean length, {main.a}", chars(lookup(length, "a", "mean_chars")) + " chars", before)
            )
    if run.align and finite(run.align.get("alignment")) is not None:
        alignment = run.align["alignment"]
        cards.append(_card("Labeler alignment", pct(alignment), ci_text(run.align.get("alignment_ci95"))))
    return cards


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


def _panels_for(trainer: TrainerLog) -> list[tuple[str, list[plots.Series], plots.Series | None]]:
    """The panels of one trainer that have data; a series equal to one already drawn, or all
    zero (e.g. the value loss of RLOO), is left out."""
    panels: list[tuple[str, list[plots.Series], plots.Series | None]] = []
    for title, keys, band_key in PANELS[trainer.kind]:
        series: list[plots.Series] = []
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
            facts.append(f"{label} {pct(value) if 'accuracy' in key else f'{value:.4g}'}")
    if trainer.status and trainer.status != "done":
        facts.append(f"stage status: {trainer.status}")
    if trainer.bad_lines:
        facts.append(f"{trainer.bad_lines} unreadable line(s) skipped")
    return " · ".join(facts)


def _trainer_block(trainer: TrainerLog) -> str:
    title = f"{KIND_TITLES[trainer.kind]} — {trainer.folder}/"
    panels = _panels_for(trainer)
    if panels:
        body = _img(plots.training_curves(panels), f"{title} training curves")
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
    value = finite(lookup(d, "value"))
    if value is None:
        return None
    ci = lookup(d, "ci95")
    ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(finite(c) is not None for c in ci)
    return value, (float(ci[0]), float(ci[1])) if ok else None


def section_win_rates(run: RunData) -> str:
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
            if (est := _estimate(lookup(c.summary, "harmless_rate", side))) is not None:
                harmless.setdefault(name, est)
    if not rates:
        return _section("win-rate", "Win rate", _note("The evaluation has no win rate."))
    png = plots.win_rates(rates, list(harmless.items()), main.a, main.b)
    lead = (
        f"How often the judge prefers {_e(main.a)}'s response to {_e(main.b)}'s on the same prompt: each pair is "
        "judged in both orders, a tie counts ½, bars show 95% bootstrap intervals. The length-controlled rate "
        "is a logistic regression of the outcome on the log length ratio, read at equal length. The harmless "
        "rate is the share of responses the judge rates harmless, each judged alone."
    )
    return _section("win-rate", "Win rate", _img(png, "win rate bars with 95% CI"), lead)


def section_lengths(run: RunData) -> str:
    main = run.primary
    if main is None or not main.samples:
        return _section(
            "lengths", "Response length", _note("No per-prompt samples (eval/samples.jsonl is missing).")
        )
    rows = [
        r for r in main.samples if finite(r.get("len_a")) is not None and finite(r.get("len_b")) is not None
    ]
    if not rows:
        return _section("lengths", "Response length", _note("The samples carry no lengths."))
    p_a = [float(r["p_a"]) for r in rows] if all(finite(r.get("p_a")) is not None for r in rows) else None
    png = plots.length_distributions(
        [r["len_b"] for r in rows], [r["len_a"] for r in rows], p_a, (main.a, main.b)
    )
    which = f" ({_e(main.a)} vs {_e(main.b)})" if len(run.comparisons) > 1 else ""
    lead = (
        f"Characters per response on the {len(rows)} evaluation prompts{which}. RLAIF policies tend to get "
        "longer; the right panel shows whether the judge rewards length."
    )
    return _section("lengths", "Response length", _img(png, "response length histograms"), lead)


def section_labeler(run: RunData) -> str:
    a = run.align
    if not a:
        return _section(
            "labeler", "AI labeler", _note("The labeler was not measured on human labels (no align.json).")
        )
    png = plots.labeler_bias(a, run.calibration)
    ece = finite(a.get("ece"))
    rows = [
        ["alignment with human labels", f"<b>{pct(a.get('alignment'))}</b> {_e(ci_text(a.get('alignment_ci95')))}",
         "argmax of the soft label = the human's choice (95% bootstrap CI)"],
        ["same position preferred", pct(a.get("same_position_preferred")),
         "picks the same slot in both orders (position bias; 0% = none)"],
        ["mean P(first slot)", pct(a.get("mean_p_first_slot")), "50% = no preference for the first slot"],
        ["P(prefers longer)", pct(a.get("p_prefers_longer")),
         f"humans: {pct(a.get('human_p_prefers_longer'))} (length bias)"],
        ["calibration error (ECE)", "—" if ece is None else f"{ece:.3f}", "0 = confidence matches accuracy"],
        ["mean confidence", pct(a.get("mean_confidence")), "mean max(p, 1-p)"],
    ]  # fmt: skip
    judge = a.get("judge") or judge_name(a.get("judge_identity"))
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
    rows = [r for r in samples if finite(r.get("p_a")) is not None]
    rows.sort(key=lambda r: (-float(r["p_a"]), str(r.get("id", ""))))
    if len(rows) <= count:
        return rows
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)]


def _response(label: str, text: Any, score: Any, length: Any, winner: bool, tone: str) -> str:
    score_n = finite(score)
    meta = [f"{chars(length)} chars"] + ([f"harmless score {score_n:+.2f}"] if score_n is not None else [])
    badge = '<span class="badge">judge prefers</span>' if winner else ""
    return (
        f'<div class="response {tone}{" winner" if winner else ""}"><div class="who">{_e(label)}{badge}</div>'
        f'<div class="text">{_e(str(text or "").strip())}</div><div class="small">{_e(" · ".join(meta))}</div></div>'
    )


def _dialogue(prompt: Any) -> str:
    """An HH-style prompt (turns "Human: ..." / "Assistant: ...", a conversation's messages as
    such turns) with bold speakers; escaped."""
    text = prompt_text(prompt_from_json(prompt)) if isinstance(prompt, list) else str(prompt or "")
    text = re.sub(r"\n*Assistant:\s*$", "", text.strip()).strip()  # the turn being answered
    text = re.sub(r"\n\n(?=(System|Human|Assistant):)", "\n", _e(text))
    return re.sub(r"(^|\n)(System|Human|Assistant):", r"\1<b>\2:</b>", text)


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
        if finite(r.get("p_a_ab")) is not None and finite(r.get("p_a_ba")) is not None:
            orders = f" (shown first: {pct(r['p_a_ab'], 0)}, shown second: {pct(r['p_a_ba'], 0)})"
        label = (
            f'<div class="softlabel"><div class="bar"><span style="width:{100 * p:.1f}%"></span></div>'
            f"<div>judge: P({_e(main.a)} better) = <b>{pct(p, 0)}</b>{_e(orders)}</div></div>"
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
    stages = manifest_stages(run.manifest)
    if stages:
        rows = []
        for name, record in stages.items():
            if record.get("outputs") == [REPORT_FILE]:
                continue  # this report itself, still being written
            status = str(record.get("status", "—"))
            seconds = finite(record.get("seconds"))
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
        f"<title>{_e(run.name)} · openrlaif report</title><style>\n{CSS}</style></head>"
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
