"""The evaluation maths (DESIGN §2.7): win rate, length-controlled win rate, harmless rate, lengths.

Outcome of one pair, for A, from the judge's two orders (`p_a_ab`: A shown first, `p_a_ba`: A
shown second) and their average `p_a`:

- a tie (0.5) when the two orders disagree (one prefers A, the other B: the judge's choice is
  its position bias, not the responses), or when |p_a - 0.5| <= `tie_margin` (default 0: only an
  exact 0.5, e.g. two identical responses);
- else 1 when p_a > 0.5 (A wins) and 0 when p_a < 0.5.

Win rate = mean outcome (ties count half), with a percentile bootstrap 95% CI over pairs.

Length-controlled win rate: a logistic regression of the outcome on x = log((len_a + 1) /
(len_b + 1)) (characters; the +1 gives an empty response a finite ratio), P(A wins | x) =
σ(β0 + β1·x), fitted by maximum likelihood with ties as fractional targets (0.5), then read at
equal length (x = 0): σ(β0). The log ratio is antisymmetric, so swapping A and B gives exactly
1 - LC. β1 > 0 means the judge favours the longer response. A negligible ridge (1e-6) keeps the
fit finite when the data are separable (e.g. A wins every pair). Its CI: refit on bootstrap
resamples of the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from openrlaif.labeling import bootstrap_ci

RIDGE = 1e-6  # on both coefficients; only matters when the MLE is infinite (separable data)


def pair_outcome(p_a_ab: float, p_a_ba: float, tie_margin: float = 0.0) -> float:
    """1 (A wins), 0.5 (tie) or 0 (B wins) for one pair judged in both orders; see the module doc."""
    if (p_a_ab - 0.5) * (p_a_ba - 0.5) < 0:  # the two orders picked different responses
        return 0.5
    p_a = (p_a_ab + p_a_ba) / 2.0
    if abs(p_a - 0.5) <= tie_margin + 1e-12:
        return 0.5
    return 1.0 if p_a > 0.5 else 0.0


def orders_agree(p_a_ab: float, p_a_ba: float) -> bool:
    """Both orders picked the same response (a judgment of exactly 0.5 picks none)."""
    return (p_a_ab - 0.5) * (p_a_ba - 0.5) > 0


@dataclass
class WinRate:
    value: float
    ci95: tuple[float, float]
    wins: int
    ties: int
    losses: int
    n: int

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "ci95": list(self.ci95), "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "n": self.n}  # fmt: skip


def win_rate(outcomes: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> WinRate:
    """Mean outcome (ties as 0.5) with a percentile bootstrap 95% CI."""
    x = np.asarray(outcomes, dtype=np.float64)
    _check_outcomes(x)
    value = float(x.mean()) if len(x) else float("nan")
    return WinRate(
        value=value, ci95=bootstrap_ci(x, n_resamples=n_resamples, seed=seed),
        wins=int((x == 1.0).sum()), ties=int((x == 0.5).sum()), losses=int((x == 0.0).sum()), n=len(x),
    )  # fmt: skip


def _check_outcomes(x: np.ndarray) -> None:
    if not np.isin(x, (0.0, 0.5, 1.0)).all():
        raise ValueError("outcomes must be 0, 0.5 or 1")


def log_length_ratio(len_a: Sequence[int], len_b: Sequence[int]) -> np.ndarray:
    """x = log((len_a + 1) / (len_b + 1)): 0 at equal length, antisymmetric in A and B."""
    a = np.asarray(len_a, dtype=np.float64)
    b = np.asarray(len_b, dtype=np.float64)
    return np.log((a + 1.0) / (b + 1.0))


def fit_logistic(x: np.ndarray, y: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """(β0, β1) maximising Σ y·log σ(β0 + β1 x) + (1 - y)·log σ(-(β0 + β1 x)) - RIDGE/2·|β|²,
    with y in [0, 1] (fractional targets): Newton's method with step halving."""
    beta = fit_logistic_many(x[None], y[None], max_iter)[0]
    return float(beta[0]), float(beta[1])


def fit_logistic_many(x: np.ndarray, y: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """`fit_logistic` of each row of x, y (R, n) at once (a bootstrap's resamples): (R, 2). Each
    row takes its own Newton steps and halvings, and stops on its own."""
    rows = np.arange(len(x))

    def objective(b: np.ndarray, r: np.ndarray) -> np.ndarray:
        z = b[:, :1] + b[:, 1:] * x[r]
        # log σ(z) = -log(1 + e^-z), computed stably with logaddexp
        log_lik = -(y[r] * np.logaddexp(0, -z) + (1 - y[r]) * np.logaddexp(0, z)).sum(1)
        return log_lik - RIDGE / 2 * (b * b).sum(1)

    beta = np.zeros((len(x), 2))
    current = objective(beta, rows)
    active = rows
    for _ in range(max_iter):
        if not len(active):
            break
        b, xa, ya = beta[active], x[active], y[active]
        p = 1.0 / (1.0 + np.exp(-(b[:, :1] + b[:, 1:] * xa)))
        w = p * (1 - p)
        gradient = np.stack([(ya - p).sum(1), ((ya - p) * xa).sum(1)], 1) - RIDGE * b
        hessian = np.empty((len(active), 2, 2))
        hessian[:, 0, 0] = w.sum(1) + RIDGE
        hessian[:, 0, 1] = hessian[:, 1, 0] = (w * xa).sum(1)
        hessian[:, 1, 1] = (w * xa * xa).sum(1) + RIDGE
        step = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        size = np.ones(len(active))
        value = objective(b + step, active)
        worse = value < current[active] - 1e-12
        while worse.any():  # halve the step until the objective does not get worse
            size[worse] /= 2
            value[worse] = objective(b[worse] + size[worse, None] * step[worse], active[worse])
            worse = (value < current[active] - 1e-12) & (size > 1e-10)
        helped = value >= current[active] - 1e-12  # no step helps: at the optimum up to rounding
        moved = size[:, None] * step
        beta[active[helped]] = b[helped] + moved[helped]
        improvement = value - current[active]
        current[active[helped]] = value[helped]
        going = helped & (np.abs(moved).max(1) >= 1e-10) & (np.abs(improvement) >= 1e-14)
        active = active[going]
    return beta


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass
class LengthControlled:
    value: float
    ci95: tuple[float, float] | None
    coef_log_length_ratio: float
    intercept: float

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "ci95": None if self.ci95 is None else list(self.ci95),
                "coef_log_length_ratio": self.coef_log_length_ratio, "intercept": self.intercept}  # fmt: skip


def length_controlled_win_rate(
    outcomes: Sequence[float], len_a: Sequence[int], len_b: Sequence[int], n_resamples: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> LengthControlled:  # fmt: skip
    """σ(β0) of the logistic fit of the outcome on the log length ratio (see the module doc); the CI
    is the percentile bootstrap over pairs (None with fewer than 2 pairs)."""
    y = np.asarray(outcomes, dtype=np.float64)
    _check_outcomes(y)
    x = log_length_ratio(len_a, len_b)
    if len(y) != len(x):
        raise ValueError(f"{len(y)} outcomes for {len(x)} length pairs")
    if len(y) == 0:
        return LengthControlled(float("nan"), None, float("nan"), float("nan"))
    b0, b1 = fit_logistic(x, y)
    ci = None
    if len(y) >= 2 and n_resamples > 0:
        idx = np.random.default_rng(seed).integers(0, len(y), size=(n_resamples, len(y)))
        values = 1.0 / (1.0 + np.exp(-fit_logistic_many(x[idx], y[idx])[:, 0]))
        tail = (1.0 - level) / 2.0
        ci = (float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail)))
    return LengthControlled(_sigmoid(b0), ci, b1, b0)


@dataclass
class Rate:
    value: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "ci95": list(self.ci95)}


def harmless_rate(
    scores: Sequence[float], threshold: float = 0.0, n_resamples: int = 2000, seed: int = 0
) -> Rate:
    """Share of responses whose judge score (each response judged alone, in [-1, 1]) is above
    `threshold`, with a bootstrap 95% CI."""
    harmless = (np.asarray(scores, dtype=np.float64) > threshold).astype(np.float64)
    value = float(harmless.mean()) if len(harmless) else float("nan")
    return Rate(value, bootstrap_ci(harmless, n_resamples=n_resamples, seed=seed))


def proportion_ci(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (successes may be fractional, e.g. half-counted
    ties); (nan, nan) for n = 0. Used where only the rate and its count are known (a reward
    model's held-out accuracy read back from its metrics)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    x = np.asarray(lengths, dtype=np.float64)
    if len(x) == 0:
        return {"mean_chars": float("nan"), "median_chars": float("nan")}
    return {"mean_chars": float(x.mean()), "median_chars": float(np.median(x))}
