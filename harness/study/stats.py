"""The statistics of a report: small pure functions, unit-tested with known answers.

Every interval is a two-sided Student-t confidence interval over seeds. Arms of a study share
their seeds (common random numbers), so an arm's effect against the baseline is the mean of
the per-seed PAIRED differences, with the t interval of those differences.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
from scipy import optimize as _scipy_optimize
from scipy import special as _scipy_special
from scipy import stats as _scipy_stats

LOWER = "lower"
HIGHER = "higher"

NO_CLEAR_EFFECT = "no clear effect"
NO_DATA = "no data"
SINGLE_PAIR = "n=1, no interval"
ROUNDING = 1e-12  # relative size of a difference that is floating-point rounding, not an effect


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=float)
    return array[np.isfinite(array)]


def t_quantile(n: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t critical value for ``n`` values (n - 1 degrees of freedom).
    scipy.special's inverse CDF: the same number as stats.t.ppf at a fiftieth of the cost,
    which the null simulations of adaptive seeds call millions of times."""
    return float(_scipy_special.stdtrit(n - 1, 0.5 + confidence / 2.0))


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of its Student-t confidence interval, and the number of finite values.

    NaN and None are dropped. n = 0 gives (nan, nan, 0); n = 1 gives (value, nan, 1): one
    seed has a value but no interval.
    """
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, 1
    half = t_quantile(n, confidence) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, half, n


def paired_differences(
    arm_values_by_seed: Mapping[int, float], baseline_values_by_seed: Mapping[int, float]
) -> list[float]:
    """Per-seed differences arm - baseline over the seeds both have a finite value for.

    A difference within floating-point rounding of the two values (relative ``ROUNDING``)
    counts as exactly zero: otherwise equal values reached by different arithmetic give
    identical tiny differences, a zero-width interval that "excludes zero", and a verdict.
    """
    diffs = []
    for seed, value in arm_values_by_seed.items():
        base = baseline_values_by_seed.get(seed)
        if value is None or base is None:
            continue
        value, base = float(value), float(base)
        if math.isfinite(value) and math.isfinite(base):
            diff = value - base
            diffs.append(0.0 if abs(diff) <= ROUNDING * max(abs(value), abs(base)) else diff)
    return diffs


def paired_effect(
    arm_values_by_seed: Mapping[int, float],
    baseline_values_by_seed: Mapping[int, float],
    confidence: float = 0.95,
) -> tuple[float, float, int]:
    """Mean of the per-seed differences (arm - baseline), the half-width of their Student-t
    interval, and the number of pairs (``paired_differences``)."""
    return mean_ci(paired_differences(arm_values_by_seed, baseline_values_by_seed), confidence)


def sign_test_p(values: Iterable[float], mu: float = 0.0) -> float:
    """Two-sided exact sign test of H0: median = ``mu``: 2 P(Binomial(m, 1/2) <= the smaller
    count of values on one side), over the m values off mu (ties dropped), capped at 1. It needs
    no variance, so it stays valid where the t test has none: every seed on one side gives
    2 * 0.5^m (0.5 at two seeds, 0.0625 at five, 0.031 at six)."""
    x = _finite(values)
    tol = ROUNDING * max(1.0, abs(mu))
    above, below = int(np.sum(x > mu + tol)), int(np.sum(x < mu - tol))
    m = above + below
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * _scipy_stats.binom.cdf(min(above, below), m, 0.5)))


def no_spread(x: np.ndarray) -> bool:
    """All values equal up to floating-point noise (relative ROUNDING of the mean)."""
    return float(x.std(ddof=1)) <= ROUNDING * max(1.0, abs(float(x.mean())))


def p_value(values: Iterable[float], mu: float = 0.0, exact: bool = False) -> float:
    """Two-sided p of the one-sample t test of H0: mean = ``mu`` (p < 0.05 exactly when the
    95% interval of ``mean_ci`` excludes mu).

    No spread (every seed equal): for an ``exact`` metric (the same for every seed by
    construction, ddpm_engine.metrics) the value is the truth, so 0 when it is off mu, else 1;
    for an estimated one, agreement of a few seeds is no proof (a two-valued metric agrees in
    2 seeds half the time), so the exact sign test (``sign_test_p``)."""
    x = _finite(values)
    n = int(x.size)
    if n < 2:
        return math.nan
    if no_spread(x):
        if not exact:
            return sign_test_p(x, mu)
        return 0.0 if abs(float(x.mean()) - mu) > ROUNDING * max(1.0, abs(mu)) else 1.0
    sd = float(x.std(ddof=1))
    t = (float(x.mean()) - mu) / (sd / math.sqrt(n))
    return float(2 * _scipy_stats.t.sf(abs(t), n - 1))


def log_values(values: Iterable[float]) -> list[float]:
    """Natural logs of the positive values; a non-positive value of a log-scale metric has no
    log and is dropped like a missing one (NaN)."""
    return [math.log(v) if v is not None and math.isfinite(v) and v > 0 else math.nan for v in values]


def log_ratios(arm_values_by_seed: Mapping[int, float], baseline_values_by_seed: Mapping[int, float]) -> list[float]:
    """Per-seed log(arm / baseline) over the seeds where both are positive and finite: the
    paired differences of a log-scale metric (``paired_differences`` of the logs)."""
    arm = {s: v for s, v in zip(arm_values_by_seed, log_values(arm_values_by_seed.values()))}
    base = {s: v for s, v in zip(baseline_values_by_seed, log_values(baseline_values_by_seed.values()))}
    return paired_differences(arm, base)


def _t_test_power(d: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample t test at level ``alpha`` over n values when the true
    mean is d standard deviations off the null: the statistic is noncentral t with n - 1 df and
    noncentrality d sqrt(n)."""
    df, nc = n - 1, d * math.sqrt(n)
    crit = _scipy_stats.t.ppf(1.0 - alpha / 2.0, df)
    lower = float(_scipy_stats.nct.cdf(-crit, df, nc))  # the wrong-sign tail: below 1e-8 here,
    # and scipy's series returns NaN for some of its far-tail values
    return float(_scipy_stats.nct.sf(crit, df, nc)) + (lower if math.isfinite(lower) else 0.0)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired effect a two-sided one-sample t test over ``n`` seeds at level
    ``alpha`` detects with ``power``, given the seed-to-seed sd of the differences: d sd with d
    solving power(d) = ``power`` under the exact noncentral t. The normal shortcut
    (t_{1-a/2} + t_power) sd / sqrt(n) understates it where it matters, at few seeds and small
    alpha: 9.96 sd instead of 11.55 at n = 2, alpha = 0.05."""
    if n < 2 or not math.isfinite(sd) or not 0 < alpha < 1:
        return math.nan
    if _t_test_power(0.0, n, alpha) >= power:
        return 0.0
    high = 1.0
    while _t_test_power(high, n, alpha) < power:
        high *= 2.0
        if high > 1e9:
            return math.inf
    d = _scipy_optimize.brentq(lambda d: _t_test_power(d, n, alpha) - power, 0.0, high, xtol=1e-10, rtol=1e-10)
    return float(d * sd)


def ci_excludes_zero(estimate: float, half_width: float) -> bool:
    """True when the interval estimate +- half_width lies entirely on one side of zero."""
    if not (math.isfinite(estimate) and math.isfinite(half_width)):
        return False
    return estimate - half_width > 0 or estimate + half_width < 0


def verdict(diff: float, half_width: float, n: int, direction: str | None) -> str:
    """What a paired difference (arm - baseline) says, in words.

    A difference whose interval includes zero is never a win: it is "no clear effect".
    ``direction`` is LOWER or HIGHER (which way is better) or None (a cost such as the
    parameter count, where only "higher" / "lower" is said).
    """
    if n == 0 or not math.isfinite(diff):
        return NO_DATA
    if n == 1:
        return SINGLE_PAIR
    if not ci_excludes_zero(diff, half_width):
        return NO_CLEAR_EFFECT
    went_up = diff > 0
    if direction is None:
        return "higher" if went_up else "lower"
    better = went_up if direction == HIGHER else not went_up
    return "better" if better else "worse"


def best_arms(means: Mapping[str, float], direction: str | None) -> set[str]:
    """The arm(s) with the best finite mean (ties all win); empty when fewer than two arms
    have a value or the metric has no better direction."""
    finite = {arm: m for arm, m in means.items() if m is not None and math.isfinite(m)}
    if direction is None or len(finite) < 2:
        return set()
    target = min(finite.values()) if direction == LOWER else max(finite.values())
    return {arm for arm, m in finite.items() if m == target}


def clear_best_arms(
    values_by_arm: Mapping[str, Mapping[int, float]],
    direction: str | None,
    confidence: float = 0.95,
) -> set[str]:
    """The arm with the best mean when it is CLEARLY best, else the empty set.

    Clearly best: its paired difference (same seeds) against every other arm with a finite
    value has a CI that excludes zero in its favour (``verdict`` says "better"). A best mean
    whose lead over some arm lies inside its CI is not a win, so ties, single pairs and
    overlapping differences mark nothing.
    """
    means = {arm: mean_ci(v.values())[0] for arm, v in values_by_arm.items()}
    best = best_arms(means, direction)
    if len(best) != 1:
        return set()
    (winner,) = best
    for arm, values in values_by_arm.items():
        if arm == winner or mean_ci(values.values())[2] == 0:
            continue
        diff, half, n = paired_effect(values_by_arm[winner], values, confidence)
        if verdict(diff, half, n, direction) != "better":
            return set()
    return {winner}
