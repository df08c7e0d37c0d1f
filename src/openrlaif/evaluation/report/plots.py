"""The report's figures, drawn with matplotlib and returned as PNG bytes.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas) and never through pyplot, so
drawing a report changes no global backend and opens no window. Every function takes plain
numbers and returns `(png_bytes, width_px)`: the width at which the page shows the image (the PNG
has twice as many pixels, so it stays sharp on high-density screens).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

# One palette for the whole report (the page's CSS uses the same colours).
BASELINE = "#94a3b8"  # the reference policy (SFT), slate
TRAINED = "#2563eb"  # the trained policy, blue
HELD_OUT = "#ea580c"  # held-out ("eval/") curves, orange
REFERENCE = "#64748b"  # reference lines (chance, no bias)
INK = "#1f2937"
PALETTE = [TRAINED, "#7c3aed", "#0d9488", "#db2777"]  # further policies / series

CSS_DPI = 96  # CSS pixels per inch
WIDTH = 10.0  # inches: the width of the report's content column
SCALE = 2  # PNG pixels per CSS pixel

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 8,
    "axes.labelsize": 8.5,
    "axes.labelcolor": "#4b5563",
    "axes.edgecolor": "#cbd5e1",
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.7,
    "xtick.color": "#6b7280",
    "ytick.color": "#6b7280",
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "text.color": INK,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


@contextmanager
def _figure(width_in: float, height_in: float) -> Iterator[Any]:
    """A styled figure; the caller draws on it inside the block."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(STYLE):  # type: ignore[arg-type]  # the stubs list every rc key as a Literal
        yield Figure(figsize=(width_in, height_in), layout="constrained")


def _png(fig: Any) -> tuple[bytes, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CSS_DPI * SCALE)
    return buf.getvalue(), int(round(fig.get_figwidth() * CSS_DPI))


def _finite(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centred moving average (no lag) over about 1/12 of the points, for noisy curves."""
    half = max(1, len(y) // 24)
    sums = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(y))
    return (sums[hi] - sums[lo]) / (hi - lo)


def _noisy(y: np.ndarray) -> bool:
    """Step-to-step jitter large against the curve's overall range."""
    spread = float(np.ptp(y))
    return len(y) > 20 and spread > 0 and float(np.median(np.abs(np.diff(y)))) > 0.02 * spread


Series = tuple[str, Sequence[float], Sequence[float]]  # (metric key, steps, values)


def training_curves(panels: Sequence[tuple[str, list[Series], Series | None]]) -> tuple[bytes, int]:
    """One row of panels for a training stage. Each panel: title, the series to draw (keys
    starting with "eval/" are held-out points, the others training curves), and an optional
    standard-deviation series drawn as a band around the first curve."""
    ncols = len(panels)
    with _figure(WIDTH, 2.5) as fig:
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        for ax, (title, series, band) in zip(axes, panels, strict=True):
            ax.set_title(title)
            ax.set_xlabel("step")
            train_colors = iter(PALETTE)
            for key, steps, values in series:
                x, y = _finite(steps, values)
                if len(x) == 0:
                    continue
                label = key.split("/", 1)[-1].replace("_", " ")
                if key.startswith("eval/"):
                    ax.plot(x, y, "o-", color=HELD_OUT, ms=3.5, lw=1.2, label=f"held-out {label}")
                    continue
                color = next(train_colors, INK)
                if band is not None and key == series[0][0]:
                    bx, bstd = _finite(band[1], band[2])
                    if len(bx) == len(x):
                        ax.fill_between(x, y - bstd, y + bstd, color=color, alpha=0.12, lw=0, label="± std")
                if _noisy(y):  # raw steps faint, a smoothed line on top
                    ax.plot(x, y, color=color, lw=0.8, alpha=0.3)
                    ax.plot(x, _smooth(y), color=color, lw=1.6, label=label)
                else:
                    ax.plot(x, y, color=color, lw=1.6, marker="o" if len(x) < 8 else None, ms=3, label=label)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
            if len(series) > 1 or band is not None:
                ax.legend(loc="best")
        if hasattr(fig, "align_titles"):  # matplotlib >= 3.9: one baseline for all panel titles
            fig.align_titles()
        return _png(fig)


Estimate = tuple[float, tuple[float, float] | None]  # value and its 95% CI


def _error(est: Estimate) -> list[list[float]]:
    value, ci = est
    if ci is None or not all(math.isfinite(c) for c in ci):
        return [[0.0], [0.0]]
    return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def _label_right(ax: Any, est: Estimate, y: float) -> None:
    """The value written just right of the bar's CI (or of the bar)."""
    value, ci = est
    right = max(value, ci[1]) if ci is not None and math.isfinite(ci[1]) else value
    ax.text(min(right, 1.0) + 0.015, y, f"{value:.1%}", va="center", fontsize=8.5, color=INK)


def win_rates(
    rates: Sequence[tuple[str, Estimate]],
    harmless: Sequence[tuple[str, Estimate]],
    trained: str,
    baseline: str,
) -> tuple[bytes, int]:
    """Left: win rates of trained policies over their references (horizontal bars, 95% CI, the
    dashed 50% tie line). Right: each policy's harmless rate (bars, 95% CI), when measured."""
    ncols = 2 if harmless else 1
    height = max(2.2, 0.42 * len(rates) + 1.2)
    with _figure(WIDTH if ncols == 2 else 6.4, height) as fig:
        axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[1.6, 1][:ncols])[0]
        ax = axes[0]
        ypos = np.arange(len(rates))[::-1]
        for y, (_, est) in zip(ypos, rates, strict=True):
            ax.barh(y, est[0], height=0.55, color=TRAINED, alpha=0.9)
            ax.errorbar(est[0], y, xerr=_error(est), fmt="none", ecolor=INK, elinewidth=1.3, capsize=4)
            _label_right(ax, est, y)
        ax.axvline(0.5, color=REFERENCE, ls="--", lw=1)
        ax.set_yticks(ypos, [label for label, _ in rates])
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, len(rates) - 0.4)
        ax.xaxis.set_major_formatter(_percent())
        ax.grid(axis="y", visible=False)
        ax.set_title(
            f"Win rate of {trained} over {baseline} (dashed: tie)"
            if len(rates) <= 2
            else "Win rates (dashed: tie)"
        )
        if harmless:
            ax = axes[1]
            colors = [BASELINE, *PALETTE]
            for x, (_, est) in enumerate(harmless):
                ax.bar(x, est[0], width=0.55, color=colors[x % len(colors)])
                ax.errorbar(x, est[0], yerr=_error(est), fmt="none", ecolor=INK, elinewidth=1.3, capsize=4)
                if est[0] > 0.12:
                    ax.text(x, est[0] / 2, f"{est[0]:.0%}", ha="center", va="center", color="white", fontsize=8.5,
                            fontweight="bold")  # fmt: skip
            ax.set_xticks(range(len(harmless)), [name for name, _ in harmless])
            ax.set_ylim(0, 1.05)
            ax.yaxis.set_major_formatter(_percent())
            ax.grid(axis="x", visible=False)
            ax.set_title("Harmless rate (95% CI)")
        return _png(fig)


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def length_distributions(
    len_b: Sequence[float], len_a: Sequence[float], p_a: Sequence[float] | None, names: tuple[str, str]
) -> tuple[bytes, int]:
    """Left: response length histograms of both policies on the same bins, means dashed.
    Right (when soft labels exist): the judge's P(trained preferred) against the length ratio."""
    trained, baseline = names
    a = np.asarray(len_a, dtype=np.float64)
    b = np.asarray(len_b, dtype=np.float64)
    ncols = 2 if p_a is not None else 1
    with _figure(WIDTH if ncols == 2 else 6.4, 2.7) as fig:
        axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[1.4, 1][:ncols])[0]
        ax = axes[0]
        top = max(float(np.max(a)) if len(a) else 0.0, float(np.max(b)) if len(b) else 0.0, 1.0)
        bins = np.linspace(0, top, min(30, max(6, (len(a) + len(b)) // 8)) + 1)
        for values, color, name in ((b, BASELINE, baseline), (a, TRAINED, trained)):
            if len(values) == 0:
                continue
            ax.hist(values, bins=bins, color=color, alpha=0.55, label=f"{name} (mean {values.mean():.0f})")
            ax.axvline(values.mean(), color=color, ls="--", lw=1.4)
        ax.set_xlabel("response length (characters)")
        ax.set_ylabel("responses")
        ax.set_title("Response length")
        ax.legend(loc="best")
        if p_a is not None:
            ax = axes[1]
            ok = (a > 0) & (b > 0)
            ratio = np.log2(a[ok] / b[ok])
            p = np.asarray(p_a, dtype=np.float64)[ok]
            ax.scatter(ratio, p, s=14, color=TRAINED, alpha=0.55, lw=0)
            ax.axhline(0.5, color=REFERENCE, ls="--", lw=1)
            ax.axvline(0.0, color=REFERENCE, ls=":", lw=1)
            ax.set_ylim(-0.02, 1.02)
            ax.yaxis.set_major_formatter(_percent())
            ax.set_xlabel(f"log₂ length ratio ({trained} / {baseline})")
            ax.set_ylabel(f"P({trained} preferred)")
            ax.set_title("Judge preference vs length")
        return _png(fig)


def labeler_bias(
    align: dict[str, Any], calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None
) -> tuple[bytes, int]:
    """The labeler against the human labels: agreement (95% CI), position and length bias, each
    beside its reference (dashed: chance / no bias); position consistency after swapping the
    order; and a reliability diagram when the per-pair labels are there."""
    rows: list[tuple[str, float, Any, str]] = []
    if align.get("alignment") is not None:
        ci = align.get("alignment_ci95")
        rows.append(("agrees with humans", align["alignment"], tuple(ci) if ci else None, TRAINED))
    if align.get("mean_p_first_slot") is not None:
        rows.append(("mean P(first slot)", align["mean_p_first_slot"], None, "#7c3aed"))
    if align.get("p_prefers_longer") is not None:
        rows.append(("P(longer), labeler", align["p_prefers_longer"], None, "#0d9488"))
    if align.get("human_p_prefers_longer") is not None:
        rows.append(("P(longer), humans", align["human_p_prefers_longer"], None, BASELINE))
    same = align.get("same_position_preferred")
    ncols = 1 + (same is not None) + (calibration is not None)
    with _figure(WIDTH if ncols > 1 else 5.0, 2.6) as fig:
        axes = list(fig.subplots(1, ncols, squeeze=False, width_ratios=[1.6, 1, 1][:ncols])[0])

        ax = axes.pop(0)
        ypos = np.arange(len(rows))[::-1]
        for y, (_, value, ci, color) in zip(ypos, rows, strict=True):
            ax.barh(y, value, height=0.6, color=color)
            ax.errorbar(value, y, xerr=_error((value, ci)), fmt="none", ecolor=INK, elinewidth=1.2, capsize=3)
            _label_right(ax, (value, ci), y)
        ax.axvline(0.5, color=REFERENCE, ls="--", lw=1)
        ax.set_yticks(ypos, [r[0] for r in rows])
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(_percent())
        ax.grid(axis="y", visible=False)
        ax.set_title("Labeler vs humans")

        if same is not None:
            ax = axes.pop(0)
            ax.bar([0, 1], [1.0 - same, same], width=0.55, color=[TRAINED, HELD_OUT])
            for x, v in enumerate((1.0 - same, same)):
                ax.text(x, v + 0.03, f"{v:.1%}", ha="center", fontsize=8.5, color=INK)
            ax.set_xticks([0, 1], ["consistent\nafter swap", "same slot in\nboth orders"])
            ax.set_ylim(0, 1.15)
            ax.yaxis.set_major_formatter(_percent())
            ax.grid(axis="x", visible=False)
            ax.set_title("Position bias")

        if calibration is not None:
            ax = axes.pop(0)
            confidence, accuracy, counts = calibration
            ax.plot([0.5, 1.0], [0.5, 1.0], color=REFERENCE, ls="--", lw=1, label="calibrated")
            ax.plot(confidence, accuracy, "o-", color=TRAINED, ms=4, lw=1.5, label="labeler")
            ax.set_xlim(0.48, 1.02)
            ax.set_ylim(0.0, 1.02)
            ax.xaxis.set_major_formatter(_percent())
            ax.yaxis.set_major_formatter(_percent())
            ax.set_xlabel("confidence max(p, 1-p)")
            ax.set_ylabel("agrees with humans")
            ax.set_title(f"Calibration ({int(counts.sum())} pairs)")
            ax.legend(loc="lower right")
        return _png(fig)
