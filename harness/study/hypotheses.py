"""Declared hypotheses of a study, judged over seeds with Student-t intervals and Holm's correction.

A study YAML may state what it expects before anything is trained::

    hypotheses:
      t200_fixed_leaks_signal:
        metric: prior_bits        # any declared per-run metric
        arm: T200-fixed           # one arm label, or omit for every arm
        versus: baseline          # baseline: paired difference (arm - baseline) by seed; none: the arm's value
        expect: above             # above | below | within
        value: 0.0                # threshold; for `within`, the margin +-value
        says: T=200 with unscaled betas leaves signal in x_T

Each (hypothesis, arm) is judged from the per-seed values (paired differences when versus the
baseline) by the two-sided Student-t confidence interval of their mean (``harness.study.stats``):

* ``above v``: supported when the interval lies wholly above v, refuted when wholly below v;
* ``below v``: the mirror;
* ``within m``: supported when the interval lies wholly inside (-m, m), refuted when it lies
  wholly beyond one edge of the margin;
* anything else is inconclusive.

Every judgement also carries the p-value of the test that decides it, built so that
p < 1 - confidence exactly when the interval rule decides. Over all rows of a study the
p-values are Holm-adjusted, and a verdict stands only when its adjusted p is below alpha.
A study with adaptive seeds is judged at each of its looks and each row's p-value is the
sequential one of harness.study.sequential (exact group-sequential boundaries, alpha spent over the
looks); ``look_n`` is the seed count of the look that gives a row its p-value (its strongest
look; all its seeds in a fixed design) and 0 while the row is inconclusive.

The metric registry (ddpm_engine.metrics) says how a row is judged: an ``exact`` metric with
no spread over seeds is decided by its value, an estimated one by the sign test
(``_judge_no_spread``); a ``log``-scale metric is judged on log values (ratios to the
baseline, geometric means), with the estimate and interval shown back on that scale.

Pure: pandas / numpy / scipy / pydantic, no MLflow, no file IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import special as _scipy_special

from ddpm_engine.metrics import PER_RUN

from .sequential import crossing_level, look_levels
from .spec import Hypothesis, scale_problem
from .stats import log_ratios, log_values, mean_ci, paired_differences, sign_test_p

SUPPORTED = "supported"
REFUTED = "refuted"
INCONCLUSIVE = "inconclusive"

EXPECTS = ("above", "below", "within")

COLUMNS = [
    "name",
    "arm",
    "metric",
    "versus",
    "expect",
    "value",
    "n",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "verdict",
    "says",
    "sentence",
    "look_n",
    "scale",
]

NO_RUN = "no finished run with this metric"
LINEAR, LOG = "linear", "log"
ZERO_SPREAD = 1e-12  # a std below this (relative to max(1, |mean|)) is floating-point noise


@dataclass(frozen=True)
class Judgement:
    """What the per-seed values say about one hypothesis, before multiplicity correction."""

    n: int
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in input order.

    With the m finite p-values sorted ascending, p_adj_(i) = max_{j<=i} min(1, (m-j+1) p_(j)).
    NaN (and None / inf) p-values stay NaN and do not count in m.
    """
    p = np.array([math.nan if v is None else float(v) for v in p_values], dtype=float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def _t_sf(t: float, df: int) -> float:
    return float(_scipy_special.stdtr(df, -t))  # = stats.t.sf(t, df), without scipy.stats' overhead


def _t_cdf(t: float, df: int) -> float:
    return float(_scipy_special.stdtr(df, t))


def within_p_values(estimate: float, se: float, n: int, margin: float) -> tuple[float, float]:
    """(p_in, p_out) of a ``within margin`` hypothesis from a t statistic with n - 1 df.

    p_in  = min(1, 2 * max(P(T >= (est + m)/se), P(T <= (est - m)/se))): TOST, the larger of
            the one-sided p-values of H0 mean <= -m and H0 mean >= +m, doubled so that
            p_in < 1 - confidence exactly when the two-sided interval lies inside (-m, m).
    p_out = min(1, 2 * min(P(T >= (est - m)/se), P(T <= (est + m)/se))): the smaller of the
            one-sided p-values of H0 mean <= +m and H0 mean >= -m, doubled so that
            p_out < 1 - confidence exactly when the interval lies wholly above +m or below -m.
    """
    df = n - 1
    p_not_below = _t_sf((estimate + margin) / se, df)  # H0: mean <= -m
    p_not_above = _t_cdf((estimate - margin) / se, df)  # H0: mean >= +m
    p_in = min(1.0, 2.0 * max(p_not_below, p_not_above))
    p_beyond_top = _t_sf((estimate - margin) / se, df)  # H0: mean <= +m
    p_beyond_bottom = _t_cdf((estimate + margin) / se, df)  # H0: mean >= -m
    p_out = min(1.0, 2.0 * min(p_beyond_top, p_beyond_bottom))
    return p_in, p_out


def _side_verdict(low: float, high: float, expect: str, value: float) -> str:
    """The interval rule: where [low, high] lies against the threshold or margin."""
    if expect == "within":
        if -value < low and high < value:
            return SUPPORTED
        if low > value or high < -value:
            return REFUTED
        return INCONCLUSIVE
    if low > value:
        return SUPPORTED if expect == "above" else REFUTED
    if high < value:
        return REFUTED if expect == "above" else SUPPORTED
    return INCONCLUSIVE


def _check_expect(expect: str, value: float) -> None:
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {', '.join(EXPECTS)}, got {expect!r}")
    if expect == "within" and not value > 0:
        raise ValueError("within needs a margin value > 0")


def judge(
    values: Sequence[float], expect: str, value: float, confidence: float = 0.95, exact: bool = False
) -> Judgement:
    """Judge per-seed ``values`` (already paired differences when versus the baseline).

    The verdict follows the two-sided Student-t interval of the mean (df = n - 1); the p-value
    is that of the test deciding it (see the module docstring and ``within_p_values``).
    NaN / inf values are dropped first. n = 1: estimate only, inconclusive. n = 0: all NaN.
    All values equal (std within floating-point noise): for an ``exact`` metric (the same in
    every seed by construction) a zero-width interval, decided by where the value lies (p = 0),
    or inconclusive with p = 1 when it sits on the threshold; for an estimated metric the seeds'
    agreement is evidence only as far as the exact sign test says (``_judge_no_spread``).
    """
    _check_expect(expect, value)
    value = float(value)
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    estimate, half, n = mean_ci(x, confidence)
    if n == 0:
        return Judgement(0, math.nan, math.nan, math.nan, math.nan, INCONCLUSIVE)
    if n == 1:
        return Judgement(1, estimate, math.nan, math.nan, math.nan, INCONCLUSIVE)

    std = float(x.std(ddof=1))
    if std < ZERO_SPREAD * max(1.0, abs(estimate)):
        if exact:
            return _judge_zero_width(n, estimate, expect, value)
        return _judge_no_spread(x, estimate, expect, value, confidence)

    se = std / math.sqrt(n)
    low, high = estimate - half, estimate + half
    verdict = _side_verdict(low, high, expect, value)
    if expect == "within":
        p_value = min(within_p_values(estimate, se, n, value))
    else:
        t = (estimate - value) / se
        p_value = min(1.0, 2.0 * _t_sf(abs(t), n - 1))
    return Judgement(n, estimate, low, high, p_value, verdict)


def _judge_zero_width(n: int, estimate: float, expect: str, value: float) -> Judgement:
    """Every seed gave the same number: the interval is that point."""

    def on(edge: float) -> bool:  # equal up to floating-point rounding
        return abs(estimate - edge) <= ZERO_SPREAD * max(1.0, abs(estimate), abs(edge))

    if on(value) or (expect == "within" and on(-value)):
        return Judgement(n, estimate, estimate, estimate, 1.0, INCONCLUSIVE)
    verdict = _side_verdict(estimate, estimate, expect, value)
    return Judgement(n, estimate, estimate, estimate, 0.0, verdict)


def _judge_no_spread(x: np.ndarray, estimate: float, expect: str, value: float, confidence: float) -> Judgement:
    """Every seed of an estimated metric gave the same number: a discrete metric, or paired
    differences of a two-valued one. There is no variance to build a t interval from, and a
    zero-width one would claim p = 0 from two seeds that agree by chance half the time. The
    exact sign test needs no variance: n values all on one side of the threshold (or margin
    edge) give p = 2 * 0.5^n, so 6 seeds at least for p < 0.05. No interval is shown."""

    def on(edge: float) -> bool:
        return abs(estimate - edge) <= ZERO_SPREAD * max(1.0, abs(estimate), abs(edge))

    n = int(x.size)
    if on(value) or (expect == "within" and on(-value)):
        return Judgement(n, estimate, math.nan, math.nan, 1.0, INCONCLUSIVE)
    # for within, the edge nearest the values: all n beyond it or all n inside it
    edge = value if expect != "within" or estimate > 0 else -value
    p_value = sign_test_p(x, edge)
    verdict = _side_verdict(estimate, estimate, expect, value) if p_value < 1.0 - confidence else INCONCLUSIVE
    return Judgement(n, estimate, math.nan, math.nan, p_value, verdict)


def _t_at(x: np.ndarray, mu: float, exact: bool) -> float:
    """The t statistic of H0: mean = mu; with no spread +-inf off mu (0 on it) for an exact
    metric, NaN for an estimated one (no variance: no t test)."""
    n, mean, sd = x.size, float(x.mean()), float(x.std(ddof=1))
    if sd < ZERO_SPREAD * max(1.0, abs(mean)):
        if not exact:
            return math.nan
        if abs(mean - mu) <= ZERO_SPREAD * max(1.0, abs(mean), abs(mu)):
            return 0.0
        return math.copysign(math.inf, mean - mu)
    return (mean - mu) / (sd / math.sqrt(n))


def _sequential(
    values: Sequence[float], expect: str, value: float, looks: Sequence[int], alpha: float, exact: bool = False
) -> tuple[float, str, int]:
    """(sequential p, verdict, n of the look that gives p) of one row whose values (in seed
    order) reach some of ``looks`` (harness.study.sequential: a look crosses when its t statistic
    passes that look's exact group-sequential boundary; p is the smallest alpha' with a crossing).

    One look: the fixed design. Fewer values than the first look (a run failed): one t test,
    its p scaled by alpha / Delta_1 (the union bound on that look alone). No spread in any
    reached look of an estimated metric: the sign test on all the values, which needs no
    multiplicity correction here: its rejection at n seeds (all on one side) implies the same
    at every earlier look, so the chance that any reached look has it is that of the first.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    reached = [n for n in looks if n <= x.size]
    if len(looks) == 1 or not reached:
        spend = look_levels(looks, alpha)[0][1]
        j = judge(x[: looks[0]], expect, value, confidence=1.0 - spend, exact=exact)
        p = j.p_value * alpha / spend if math.isfinite(j.p_value) else math.nan
        return min(1.0, p) if math.isfinite(p) else p, j.verdict, j.n
    if not exact and x.std(ddof=1) < ZERO_SPREAD * max(1.0, abs(float(x.mean()))):
        j = judge(x, expect, value, confidence=1.0 - alpha, exact=False)
        return j.p_value, j.verdict, j.n
    if expect != "within":
        t = [_t_at(x[:n], value, exact) for n in reached]
        p, k = crossing_level(looks, [abs(v) for v in t])
        if k < 0:
            return p, INCONCLUSIVE, reached[-1]
        went_up = t[k] > 0
        return p, SUPPORTED if went_up == (expect == "above") else REFUTED, reached[k]
    # TOST: each one-sided statistic against the two-sided boundaries (p doubles as in judge)
    low = [_t_at(x[:n], -value, exact) for n in reached]  # large: mean > -m
    high = [_t_at(x[:n], value, exact) for n in reached]  # small: mean < +m
    p_above_low, k1 = crossing_level(looks, low)
    p_below_high, k2 = crossing_level(looks, [-v for v in high])
    p_in = max(p_above_low, p_below_high)
    p_top, k3 = crossing_level(looks, high)
    p_bottom, k4 = crossing_level(looks, [-v for v in low])
    p_out, k_out = (p_top, k3) if p_top <= p_bottom else (p_bottom, k4)
    if p_in <= p_out and min(k1, k2) >= 0:
        return p_in, SUPPORTED, reached[max(k1, k2)]
    if k_out >= 0:
        return p_out, REFUTED, reached[k_out]
    return 1.0, INCONCLUSIVE, reached[-1]


class _SeedValues:
    """{seed: value} of an arm's finite values of a metric, each read from ``per_run`` once
    (a study's rows share arms and metrics; the null simulations evaluate thousands of them)."""

    def __init__(self, per_run: pd.DataFrame):
        self.columns = set(per_run.columns)
        self.rows = {arm: rows for arm, rows in per_run.groupby("arm", sort=False)} if "arm" in self.columns else {}
        self.cache: dict[tuple[str, str], dict[Any, float]] = {}

    def __call__(self, arm: str, metric: str) -> dict[Any, float]:
        if (arm, metric) not in self.cache:
            rows = self.rows.get(arm)
            if rows is None:
                self.cache[arm, metric] = {}
            else:
                values = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float)
                keep = np.isfinite(values)
                self.cache[arm, metric] = dict(zip(rows["seed"].to_numpy()[keep], values[keep]))
        return self.cache[arm, metric]


def _values(hypothesis: Hypothesis, arm: str, by_seed: _SeedValues, baseline: str | None, scale: str) -> list[float]:
    """The per-seed numbers a (hypothesis, arm) row is judged on, in seed order (looks take
    prefixes); empty when there are none. On a log scale: log values, or per-seed log ratios
    arm / baseline; a non-positive value has no log and is left out like a missing one."""
    if not {"arm", "seed", hypothesis.metric} <= by_seed.columns:
        return []
    arm_values = by_seed(arm, hypothesis.metric)
    if hypothesis.versus == "none":
        ordered = [arm_values[s] for s in sorted(arm_values)]
        return [v for v in log_values(ordered) if math.isfinite(v)] if scale == LOG else ordered
    if baseline is None:
        return []
    base_values = by_seed(baseline, hypothesis.metric)
    common = sorted(set(arm_values) & set(base_values))
    pair = paired_differences if scale == LINEAR else log_ratios
    return pair({s: arm_values[s] for s in common}, {s: base_values[s] for s in common})


def metric_scale(metric: str) -> tuple[str, bool]:
    """(scale, exact) of a metric from the registry (ddpm_engine.metrics); a name it does not
    declare is judged as an estimated metric on the linear scale."""
    declared = PER_RUN.get(metric)
    return (declared.scale, declared.exact) if declared is not None else (LINEAR, False)


def _threshold(hypothesis: Hypothesis, scale: str) -> float:
    """The threshold or margin on the scale the values are judged on: log v for a log metric's
    own value, log(1 + m) for a ratio's margin, 0 (a ratio of 1) for above / below the baseline."""
    if scale == LINEAR:
        return float(hypothesis.value)
    problem = scale_problem(hypothesis, LOG)
    if problem:
        raise ValueError(f"hypothesis on {hypothesis.metric}: {problem}")
    if hypothesis.versus == "none":
        return math.log(hypothesis.value)
    return math.log1p(hypothesis.value) if hypothesis.expect == "within" else 0.0


def _arms_of(hypothesis: Hypothesis, arms: Sequence[str], baseline: str | None) -> list[str]:
    if hypothesis.arm is not None:
        return [hypothesis.arm]
    if hypothesis.versus == "baseline":
        return [a for a in arms if a != baseline]
    return list(arms)


def evaluate(
    hypotheses: Mapping[str, Hypothesis],
    per_run: pd.DataFrame,
    arms: list[str],
    baseline: str | None,
    confidence: float = 0.95,
    alpha: float = 0.05,
    looks: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (hypothesis, arm), with Holm-adjusted p-values over every row of the study.

    ``looks`` (adaptive seeds: the seed counts of the looks, e.g. [3, 4, ..., 8]) judges each
    row sequentially (harness.study.sequential) on prefixes of its values in seed order; n, the
    estimate and the interval shown are those of all its values. None: one fixed-size test.

    ``per_run`` has columns ``arm, seed`` and one column per metric (a row per finished run).
    A hypothesis without an arm applies to every arm in ``arms`` order (except the baseline
    itself when versus the baseline). The final verdict is the judge's supported / refuted
    only when the Holm-adjusted p is below ``alpha``, else inconclusive. A missing metric
    column, or no baseline for a versus-baseline hypothesis, gives an n = 0 inconclusive row.
    """
    by_seed = _SeedValues(per_run)
    rows = []
    for name, hypothesis in hypotheses.items():
        scale, exact = metric_scale(hypothesis.metric)
        threshold = _threshold(hypothesis, scale)
        for arm in _arms_of(hypothesis, arms, baseline):
            values = _values(hypothesis, arm, by_seed, baseline, scale)
            j = judge(values, hypothesis.expect, threshold, confidence, exact=exact)
            p_value, verdict, look_n = j.p_value, j.verdict, j.n
            if looks and values:
                p_value, verdict, look_n = _sequential(values, hypothesis.expect, threshold, looks, alpha, exact)
            if scale == LOG:  # shown as a ratio arm / baseline or a geometric mean
                j = Judgement(j.n, *(math.exp(v) for v in (j.estimate, j.ci_low, j.ci_high)), j.p_value, j.verdict)
            rows.append(
                {
                    "name": name,
                    "arm": arm,
                    "metric": hypothesis.metric,
                    "versus": hypothesis.versus,
                    "expect": hypothesis.expect,
                    "value": float(hypothesis.value),
                    "n": j.n,
                    "estimate": j.estimate,
                    "ci_low": j.ci_low,
                    "ci_high": j.ci_high,
                    "p_value": p_value,
                    "verdict": verdict,
                    "says": hypothesis.says,
                    "look_n": look_n,
                    "scale": scale,
                }
            )
    adjusted = holm([r["p_value"] for r in rows])
    for row, p_adj in zip(rows, adjusted):
        row["p_adjusted"] = p_adj
        if not (math.isfinite(p_adj) and p_adj < alpha):
            row["verdict"] = INCONCLUSIVE
            row["look_n"] = 0
        row["sentence"] = sentence(row, confidence)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["n"] = frame["n"].astype(int)
    frame["look_n"] = frame["look_n"].astype(int)
    for column in ("value", "estimate", "ci_low", "ci_high", "p_value", "p_adjusted"):
        frame[column] = frame[column].astype(float)
    return frame


def _num(x: float, signed: bool = False) -> str:
    """3 significant digits; ``signed`` puts a + on positive numbers."""
    x = float(x)
    if x == 0:
        x = 0.0  # no "-0"
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def _p(p: float) -> str:
    text = f"{float(p):.3g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _is_finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def quantity(row: Mapping[str, Any]) -> str:
    """What a row's estimate is: the metric, its difference from the baseline, or on a log
    scale the ratio arm / baseline (geometric mean of the per-seed ratios) or its geometric mean."""
    log = row.get("scale", LINEAR) == LOG
    if row["versus"] == "baseline":
        return f"{row['metric']} ratio arm/baseline" if log else f"{row['metric']} − baseline"
    return f"{row['metric']} geometric mean" if log else f"{row['metric']}"


def expectation(row: Mapping[str, Any]) -> str:
    """The claim on the scale of ``quantity``: "above 0", "within ±0.01", "ratio below 1",
    "ratio within 0.909 to 1.1"."""
    value = float(row["value"])
    if row.get("scale", LINEAR) == LOG and row["versus"] == "baseline":
        if row["expect"] == "within":
            return f"ratio within {_num(1.0 / (1.0 + value))} to {_num(1.0 + value)}"
        return f"ratio {row['expect']} 1"
    return f"within ±{_num(value)}" if row["expect"] == "within" else f"{row['expect']} {_num(value)}"


def sentence(row: Mapping[str, Any], confidence: float = 0.95) -> str:
    """One plain sentence for a row of ``evaluate``, e.g.

    ``T200-fixed: prior_bits − baseline = +0.544 (95% CI 0.544 to 0.544, n=2), expected above 0:
    supported (Holm-adjusted p = 0.0).``, prefixed with the hypothesis's ``says`` when given.
    A log-scale metric reads ``heldout_loss ratio arm/baseline = 0.93 (95% CI 0.9 to 0.97, n=3),
    expected ratio below 1``.
    """
    signed = row["versus"] == "baseline" and row.get("scale", LINEAR) != LOG
    n = int(row["n"])
    if n == 0 or not _is_finite(row["estimate"]):
        measured = f"{quantity(row)}: {NO_RUN}"
    else:
        estimate = _num(row["estimate"], signed=signed)
        if n == 1:
            interval = f"(n={n}, no interval)"
        elif not (_is_finite(row["ci_low"]) and _is_finite(row["ci_high"])):
            interval = f"(n={n}, every seed equal: no t interval, judged by the sign test)"
        else:
            level = f"{confidence * 100:g}%"
            interval = f"({level} CI {_num(row['ci_low'])} to {_num(row['ci_high'])}, n={n})"
        measured = f"{quantity(row)} = {estimate} {interval}"
    judged = str(row["verdict"])
    p_adj = row.get("p_adjusted", math.nan)
    if _is_finite(p_adj):
        judged += f" (Holm-adjusted p = {_p(p_adj)})"
    text = f"{row['arm']}: {measured}, expected {expectation(row)}: {judged}."
    says = row.get("says", "")
    if isinstance(says, str) and says.strip():
        text = f"{says.strip()} — {text}"
    return text
