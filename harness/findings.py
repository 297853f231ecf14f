"""Findings: the seed's three observations, each tested on a study's own data.

The seed research saw three things in its first run (DDPM on small images giving dark,
saturated samples). A report states, per arm, whether each one reproduces on the study's
data, with its numbers and 95% CI, and whatever the data say is the finding:

F1  the per-t loss at the smallest t is above the loss at mid t;
F2  the predicted noise's mean and std depart from 0 and 1;
F3  the final samples' mean and fraction of saturated pixels depart from the data's.

Everything here is a small pure function over the report's DataFrames (``runs``, ``per_t``,
``quality``; column meanings in ``harness.tables``) returning plain dataclasses. Only runs
whose ``runs`` row says ``finished`` count (one per arm and seed), and ``per_t`` is read at
each run's final probe step (its largest ``step``).

Definitions (one value per run, then per arm the mean over seeds with its two-sided 95%
Student-t CI, df = n - 1, from ``harness.stats.mean_ci``):

F1  d1 = loss_mse(t_small) - loss_mse(t_mid); t_small = the smallest probed t (the grid
    always holds t = 1), t_mid = the probed t other than t_small nearest T/2, T = the largest
    probed t (the grid always holds T), ties to the smaller t. Both losses are shown too.
    Verdict: reproduced if the CI lies above 0, not reproduced if it lies below 0, else
    inconclusive.
F2  three parts.
    bias      = max over probed t of |err_mean|, and the t where it occurs. err_mean is the
                mean of (predicted - true noise) over the probe's fixed draw, so the mean of
                the draw itself cancels (eps_pred_mean would carry it).
    std_small = eps_pred_std(t_small) - 1 (signed; the error-free reference is the std of the
                true noise, 1).
    std_over_t = mean over t = t_small..T of |eps_pred_std(t) - 1|, linearly interpolated
                between probed t, i.e. the departure at a uniformly drawn t. For T <= 200 every
                t is probed and this is the plain mean; for larger T the probe grid crowds
                small t (geometric half), and a plain mean over grid points would weight them
                by the grid instead of by t.
    Verdict per part: reproduced when the CI lies beyond the tolerance (above ``BIAS_TOL``
    for bias, outside +-``STD_TOL`` for std_small, above ``STD_TOL`` for std_over_t), not
    reproduced when it lies within it, else inconclusive.
F3  two parts, from the ``quality`` table.
    mean_gap = final_mean_gap: mean pixel of the final samples minus that of the held-out
               data (the drift table's t = 0 row); negative = darker.
    sat_gap  = sat_frac - ref_sat_frac: fraction of pixels with |x| >= 0.99 in the samples
               minus in the (training) data; positive = more saturated.
    Verdict per part: reproduced ("darker" / "brighter", "more saturated" / "less
    saturated") when the CI lies outside +-``GAP_TOL``, not reproduced when inside, else
    inconclusive.

An arm's verdict on a finding with parts: reproduced when every part is, partly reproduced
when some are, not reproduced when every part with data is not, else inconclusive.

Tolerances, and why the verdicts have three outcomes rather than "CI excludes 0 or not":

- Every arm and seed is probed on the SAME held-out images and noise, and samples from the
  SAME x_T (common random numbers). That makes differences between arms sharp, but it also
  means the CI over seeds leaves out the sampling error of that one shared draw. Even the
  ideal predictor E[eps | x_t] has a nonzero mean error on a fixed draw, the same for every
  seed: the mean of N errors of std <= 1, about 1/sqrt(N). BIAS_TOL = 0.03 is three standard
  errors of the mean of N = 11,520 standard normals (the digits probe: its 180 held-out
  images x 64 pixels; 3 / sqrt(11520) = 0.028); a bias below it cannot be told from the
  draw. Larger images give a larger N, so 0.03 is conservative there. The bias is a maximum
  over the probed t, which grows with the grid by chance; 3 still covers the largest |z| of 40
  independent standard normals (the default grid for T > 200) nine times in ten.
- STD_TOL = 0.05: 5% of the ideal std. The std of N standard normals is itself 1 +- 1/sqrt(2N)
  (0.007 for the digits probe), so 0.05 is far above the draw's own error and below it the
  predicted noise is not "departing from 1" in any way the seed's plot could show. Note that
  even E[eps | x_t] has std sqrt(1 - mmse(t)) < 1 wherever the noise is not identifiable from
  x_t (mid t), so std_over_t measures the departure from the seed's reference line, not
  miscalibration; std_small is taken where 1 is the right reference (at t = 1 the noise of
  quantized data is identifiable: sqrt(beta_1) = 0.01 for the linear schedule, against a
  grey-level spacing of 0.125 for digits).
- GAP_TOL = 0.01 for both F3 gaps: a practical-equivalence margin. A mean shift of 0.01 (0.5%
  of the [-1, 1] pixel range) is about 1.3 grey levels in 255 (a twelfth of a digits grey
  level) and 1% of pixels is under one pixel per 8x8 image: nothing a sample grid shows, which
  is where the seed saw "dark, saturated" samples. The shared x_T draw is a second reason for
  a margin.
- With a tolerance the data can do three things: show the departure (CI beyond the
  tolerance), rule it out (CI within the tolerance) or neither (CI across its edge). Calling
  the last "not reproduced" would say the data contradict the seed when they only fail to
  decide, so it is "inconclusive". F1's question is a sign, so its tolerance is 0 and the
  three outcomes are the issue's (above 0, below 0, across 0). One seed gives no interval:
  inconclusive. No finished run with the needed columns: no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .stats import mean_ci

FINISHED = "finished"
CONFIDENCE = 0.95

REPRODUCED = "reproduced"
PARTLY = "partly reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NO_DATA = "no data"

BIAS_TOL = 0.03
STD_TOL = 0.05
GAP_TOL = 0.01


# --------------------------------------------------------------------------------------
# Result types


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds of per-run values, with the half-width of its Student-t CI."""

    mean: float
    half: float  # nan when n < 2
    n: int
    values: tuple[float, ...] = ()  # the finite per-run values, in seed order
    seeds: tuple[int, ...] = ()
    confidence: float = CONFIDENCE

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.half) and math.isfinite(self.mean)


@dataclass(frozen=True)
class Check:
    """One tested quantity of one arm and what its CI says about it."""

    key: str
    label: str
    estimate: Estimate
    tolerance: float
    status: str  # REPRODUCED / NOT_REPRODUCED / INCONCLUSIVE / NO_DATA
    word: str  # the direction or reason: "above 0", "darker", "within ±0.01", ...


@dataclass(frozen=True)
class ArmResult:
    arm: str
    n_runs: int  # finished runs with data for this finding
    checks: dict[str, Check]
    shown: dict[str, Estimate]  # numbers shown beside the checks (no verdict of their own)
    t_used: dict[str, str]  # e.g. {"t_small": "1", "t_mid": "500"}; "1, 2" when seeds differ
    status: str


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str  # "check", "shown" or "t"
    signed: bool = False  # show a sign: the number is a difference


@dataclass
class Finding:
    key: str  # "F1", "F2", "F3"
    title: str
    definition: str
    columns: list[Column]
    arms: list[ArmResult]
    baseline: str | None
    sentence: str  # the overall verdict for the baseline arm and the count of arms
    per_run: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def n_with_data(self) -> int:
        return sum(a.status != NO_DATA for a in self.arms)

    @property
    def n_reproduced(self) -> int:
        return sum(a.status == REPRODUCED for a in self.arms)

    @property
    def n_partly(self) -> int:
        return sum(a.status == PARTLY for a in self.arms)

    def arm(self, name: str) -> ArmResult:
        return next(a for a in self.arms if a.arm == name)


# --------------------------------------------------------------------------------------
# Selecting the data


def finished_runs(runs: pd.DataFrame | None) -> pd.DataFrame:
    """run_key, arm, seed of the finished runs, one per (arm, seed) (a later row wins)."""
    columns = ["run_key", "arm", "seed"]
    if runs is None or runs.empty or not set(columns) <= set(runs.columns):
        return pd.DataFrame({"run_key": pd.Series(dtype=str), "arm": pd.Series(dtype=str),
                             "seed": pd.Series(dtype=int)})
    rows = runs
    if "status" in rows:
        rows = rows[rows["status"] == FINISHED]
    rows = rows[rows["run_key"].notna() & rows["arm"].notna() & rows["seed"].notna()]
    rows = rows[rows["run_key"].astype(str) != ""][columns].copy()
    rows["run_key"] = rows["run_key"].astype(str)
    rows["arm"] = rows["arm"].astype(str)
    rows["seed"] = rows["seed"].astype(int)
    rows = rows.drop_duplicates("run_key", keep="last").drop_duplicates(["arm", "seed"], keep="last")
    return rows.reset_index(drop=True)


def joined(table: pd.DataFrame | None, runs: pd.DataFrame | None) -> pd.DataFrame:
    """The table's rows of finished runs, with the runs table's arm and seed."""
    done = finished_runs(runs)
    if table is None or table.empty or "run_key" not in table:
        return done.iloc[0:0]
    table = table.drop(columns=[c for c in ("arm", "seed") if c in table])
    table = table.assign(run_key=table["run_key"].astype(str))
    return table.merge(done, on="run_key")


def final_probe(per_t: pd.DataFrame | None, runs: pd.DataFrame | None) -> pd.DataFrame:
    """per_t rows of finished runs at each run's final probe step."""
    frame = joined(per_t, runs)
    if frame.empty or "step" not in frame:
        return frame
    last = frame.groupby("run_key")["step"].transform("max")
    return frame[frame["step"] == last]


def _curve(rows: pd.DataFrame, column: str) -> pd.Series:
    """column by t (sorted, finite values only; duplicate t averaged)."""
    if column not in rows or "t" not in rows:
        return pd.Series(dtype=float)
    values = pd.to_numeric(rows[column], errors="coerce")
    keep = np.isfinite(values.to_numpy(float)) & rows["t"].notna().to_numpy()
    return values[keep].groupby(rows["t"][keep].astype(int)).mean().sort_index()


def nearest_t(ts: Iterable[int], target: float) -> int:
    """The t of ``ts`` nearest ``target``; ties go to the smaller t."""
    return min(ts, key=lambda t: (abs(t - target), t))


def mean_over_t(curve: pd.Series) -> float:
    """Mean of a per-t curve over every integer t from its first to its last probed t,
    linearly interpolated between probed t (the plain mean when every t is probed)."""
    if curve.empty:
        return math.nan
    ts = curve.index.to_numpy(float)
    every = np.arange(int(ts[0]), int(ts[-1]) + 1)
    return float(np.interp(every, ts, curve.to_numpy(float)).mean())


# --------------------------------------------------------------------------------------
# Per-run quantities


def _per_run(frame: pd.DataFrame, columns: list[str], one_run: Callable[[pd.DataFrame], dict]) -> pd.DataFrame:
    rows = []
    for key, rows_of_run in frame.groupby("run_key", sort=False):
        out = one_run(rows_of_run)
        if out:
            rows.append({"run_key": key, "arm": rows_of_run["arm"].iloc[0], "seed": int(rows_of_run["seed"].iloc[0]), **out})
    return pd.DataFrame(rows, columns=["run_key", "arm", "seed", *columns])


F1_COLUMNS = ["T", "t_small", "t_mid", "loss_small", "loss_mid", "d1"]


def f1_per_run(per_t: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run with a final probe: T, t_small, t_mid, both losses and d1."""

    def one(rows: pd.DataFrame) -> dict:
        loss = _curve(rows, "loss_mse")
        if len(loss) < 2:
            return {}
        T = int(rows["t"].max())
        t_small = int(loss.index[0])
        t_mid = nearest_t(loss.index[1:], T / 2)  # never t_small itself
        return {"T": T, "t_small": t_small, "t_mid": int(t_mid), "loss_small": float(loss[t_small]),
                "loss_mid": float(loss[t_mid]), "d1": float(loss[t_small] - loss[t_mid])}

    return _per_run(final_probe(per_t, runs), F1_COLUMNS, one)


F2_COLUMNS = ["bias_t", "bias_signed", "bias", "t_small", "std_small_value", "std_small", "std_over_t"]


def f2_per_run(per_t: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run with a final probe: the largest |err_mean| (bias) and its t
    and signed value; eps_pred_std - 1 at the smallest t; mean over t of |eps_pred_std - 1|."""

    def one(rows: pd.DataFrame) -> dict:
        err, std = _curve(rows, "err_mean"), _curve(rows, "eps_pred_std")
        if err.empty and std.empty:
            return {}
        out = dict.fromkeys(F2_COLUMNS, math.nan)
        if not err.empty:
            magnitude = err.abs()
            t_star = int(magnitude[magnitude == magnitude.max()].index[0])  # ties: smaller t
            out.update(bias_t=t_star, bias_signed=float(err[t_star]), bias=float(magnitude[t_star]))
        if not std.empty:
            t_small = int(std.index[0])
            out.update(t_small=t_small, std_small_value=float(std[t_small]), std_small=float(std[t_small] - 1.0),
                       std_over_t=mean_over_t((std - 1.0).abs()))
        return out

    return _per_run(final_probe(per_t, runs), F2_COLUMNS, one)


F3_COLUMNS = ["final_mean_gap", "sat_frac", "ref_sat_frac", "sat_gap"]


def f3_per_run(quality: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run with a quality row: the final mean gap, both saturated
    fractions and their difference (NaN where a column is missing)."""

    def number(rows: pd.DataFrame, column: str) -> float:
        if column not in rows:
            return math.nan
        value = pd.to_numeric(rows[column], errors="coerce").iloc[-1]
        return float(value) if pd.notna(value) else math.nan

    def one(rows: pd.DataFrame) -> dict:
        out = {c: number(rows, c) for c in ("final_mean_gap", "sat_frac", "ref_sat_frac")}
        out["sat_gap"] = out["sat_frac"] - out["ref_sat_frac"]
        return out

    return _per_run(joined(quality, runs), F3_COLUMNS, one)


# --------------------------------------------------------------------------------------
# Verdicts


def estimate(per_run: pd.DataFrame, arm: str, column: str, confidence: float = CONFIDENCE) -> Estimate:
    """Mean over the arm's seeds of ``column`` with its Student-t CI (NaN dropped)."""
    if per_run.empty or column not in per_run:
        return Estimate(math.nan, math.nan, 0)
    rows = per_run[per_run["arm"] == arm].sort_values("seed")
    values = pd.to_numeric(rows[column], errors="coerce").to_numpy(float)
    keep = np.isfinite(values)
    mean, half, n = mean_ci(values[keep], confidence)
    return Estimate(mean, half, n, tuple(float(v) for v in values[keep]),
                    tuple(int(s) for s in rows["seed"].to_numpy()[keep]), confidence)


def judge_above(est: Estimate, tolerance: float = 0.0) -> tuple[str, str]:
    """The observation "the quantity is above ``tolerance``": (status, word)."""
    if est.n == 0:
        return NO_DATA, "no finished run"
    if not est.has_interval:
        return INCONCLUSIVE, "n=1, no interval"
    limit = _num(tolerance)
    if est.lo > tolerance:
        return REPRODUCED, f"above {limit}"
    if est.hi < tolerance:
        return NOT_REPRODUCED, f"below {limit}" if tolerance == 0 else f"within {limit}"
    return INCONCLUSIVE, f"CI includes {limit}"


def judge_departure(est: Estimate, tolerance: float, below: str, above: str) -> tuple[str, str]:
    """The observation "the quantity departs from 0 by more than ``tolerance``, either way":
    (status, word) where word names the side (``below`` / ``above``)."""
    if est.n == 0:
        return NO_DATA, "no finished run"
    if not est.has_interval:
        return INCONCLUSIVE, "n=1, no interval"
    band = f"±{_num(tolerance)}"
    if est.lo > tolerance:
        return REPRODUCED, above
    if est.hi < -tolerance:
        return REPRODUCED, below
    if est.lo > -tolerance and est.hi < tolerance:
        return NOT_REPRODUCED, f"within {band}"
    return INCONCLUSIVE, f"CI crosses {band}"


def combine(statuses: Sequence[str]) -> str:
    """An arm's verdict on a finding from its parts' verdicts (see the module docstring)."""
    have = [s for s in statuses if s != NO_DATA]
    if not have:
        return NO_DATA
    if len(have) == len(statuses) and all(s == REPRODUCED for s in have):
        return REPRODUCED
    if any(s == REPRODUCED for s in have):
        return PARTLY
    if all(s == NOT_REPRODUCED for s in have):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _t_text(per_run: pd.DataFrame, arm: str, column: str) -> str:
    if per_run.empty or column not in per_run:
        return ""
    values = pd.to_numeric(per_run.loc[per_run["arm"] == arm, column], errors="coerce").dropna()
    return ", ".join(str(int(v)) for v in sorted(set(values)))


def _arm_order(arms: Sequence[str] | None, runs: pd.DataFrame | None) -> list[str]:
    if arms is not None:
        return [str(a) for a in arms]
    if runs is None or runs.empty or "arm" not in runs:
        return []
    return [str(a) for a in dict.fromkeys(runs["arm"].dropna())]


def _num(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def _signed(x: float) -> str:
    text = _num(x)
    return text if text == "–" or text.startswith("-") else "+" + text


def interval_text(est: Estimate, signed: bool = False, where: str = "") -> str:
    """'+0.34 (95% CI 0.226 to 0.454, n=3)', for sentences; ``where`` follows the value."""
    if est.n == 0:
        return "no data"
    value = (_signed(est.mean) if signed else _num(est.mean)) + where
    if not est.has_interval:
        return f"{value} (n={est.n}, no interval)"
    return f"{value} ({est.confidence:.0%} CI {_num(est.lo)} to {_num(est.hi)}, n={est.n})"


def describe(check: Check, signed: bool = False, label: str | None = None, where: str = "") -> str:
    """'label +0.34 (95% CI 0.226 to 0.454, n=3): above 0', for sentences."""
    label = check.label if label is None else label
    if check.estimate.n == 0:
        return f"{label} no data"
    return f"{label} {interval_text(check.estimate, signed, where)}: {check.word}"


def _sentence(key: str, what: str, arms: list[ArmResult], baseline: str | None, details: Callable[[ArmResult], str]) -> str:
    """One sentence: the baseline arm's verdict with its numbers, then how many arms reproduce."""
    with_data = [a for a in arms if a.status != NO_DATA]
    if not with_data:
        return f"{key} ({what}): no data, as no arm has a finished run with the columns it needs."
    partly = sum(a.status == PARTLY for a in arms)
    count = (f"reproduced in {sum(a.status == REPRODUCED for a in arms)} of {len(with_data)} arm(s) with data"
             + (f", partly in {partly}" if partly else ""))
    base = next((a for a in arms if a.arm == baseline), None)
    if base is None or base.status == NO_DATA:
        return f"{key} ({what}): no data for the baseline arm {baseline or '(none)'}; {count}."
    return f"{key} ({what}) on the baseline arm {base.arm}: {base.status} — {details(base)}; {count}."


# --------------------------------------------------------------------------------------
# The three findings


def finding_f1(runs: pd.DataFrame, per_t: pd.DataFrame, arms: Sequence[str] | None = None,
               baseline: str | None = None, confidence: float = CONFIDENCE) -> Finding:
    per_run = f1_per_run(per_t, runs)
    results = []
    for arm in _arm_order(arms, runs):
        d1 = estimate(per_run, arm, "d1", confidence)
        status, word = judge_above(d1, 0.0)
        check = Check("d1", "d1 = loss(t_small) - loss(t_mid)", d1, 0.0, status, word)
        results.append(ArmResult(
            arm, d1.n, {"d1": check},
            {"loss_small": estimate(per_run, arm, "loss_small", confidence),
             "loss_mid": estimate(per_run, arm, "loss_mid", confidence)},
            {"t_small": _t_text(per_run, arm, "t_small"), "t_mid": _t_text(per_run, arm, "t_mid")},
            status))
    baseline = _baseline(baseline, results)

    def details(arm: ArmResult) -> str:
        check = arm.checks["d1"]
        return (f"loss at t={arm.t_used['t_small']} ({_num(arm.shown['loss_small'].mean)}) minus loss at "
                f"t={arm.t_used['t_mid']} ({_num(arm.shown['loss_mid'].mean)}) = {interval_text(check.estimate, signed=True)}: {check.word}")

    return Finding(
        "F1", "per-t loss at the smallest t above the loss at mid t",
        "Per run, at its final probe: d1 = loss_mse(t_small) − loss_mse(t_mid), t_small = the smallest probed t, "
        "t_mid = the probed t other than t_small nearest T/2 (T = the largest probed t; ties to the smaller t). Per arm: mean of d1 over seeds "
        f"± half-width of its {confidence:.0%} Student-t CI (df = n − 1). Reproduced if the CI lies above 0, "
        "not reproduced if it lies below 0, else inconclusive.",
        [Column("t_small", "t_small", "t"), Column("loss_small", "loss(t_small)", "shown"),
         Column("t_mid", "t_mid", "t"), Column("loss_mid", "loss(t_mid)", "shown"),
         Column("d1", "d1 = loss(t_small) − loss(t_mid)", "check", signed=True)],
        results, baseline, _sentence("F1", "per-t loss at the smallest t above mid t", results, baseline, details), per_run)


def finding_f2(runs: pd.DataFrame, per_t: pd.DataFrame, arms: Sequence[str] | None = None,
               baseline: str | None = None, confidence: float = CONFIDENCE,
               bias_tol: float = BIAS_TOL, std_tol: float = STD_TOL) -> Finding:
    per_run = f2_per_run(per_t, runs)
    results = []
    for arm in _arm_order(arms, runs):
        bias = estimate(per_run, arm, "bias", confidence)
        small = estimate(per_run, arm, "std_small", confidence)
        over_t = estimate(per_run, arm, "std_over_t", confidence)
        checks = {
            "bias": Check("bias", "largest |bias|", bias, bias_tol, *judge_above(bias, bias_tol)),
            "std_small": Check("std_small", "std − 1 at t_small", small, std_tol,
                               *judge_departure(small, std_tol, "std below 1", "std above 1")),
            "std_over_t": Check("std_over_t", "mean over t of |std − 1|", over_t, std_tol, *judge_above(over_t, std_tol)),
        }
        results.append(ArmResult(
            arm, max(bias.n, small.n), checks,
            {"bias_signed": estimate(per_run, arm, "bias_signed", confidence)},
            {"bias_t": _t_text(per_run, arm, "bias_t"), "t_small": _t_text(per_run, arm, "t_small")},
            combine([c.status for c in checks.values()])))
    baseline = _baseline(baseline, results)

    def details(arm: ArmResult) -> str:
        c = arm.checks
        return (f"{describe(c['bias'], where=' at t=' + arm.t_used['bias_t'])}, "
                f"{describe(c['std_small'], signed=True, label='std − 1 at t=' + arm.t_used['t_small'])}, "
                f"{describe(c['std_over_t'])}")

    return Finding(
        "F2", "the predicted noise's mean and std departing from 0 and 1",
        "Per run, at its final probe: bias = the largest |err_mean| over probed t (err_mean = mean of predicted minus true noise "
        "on the fixed probe draw, so the draw's own mean cancels), with the t where it occurs; std − 1 at t_small = "
        "eps_pred_std(t_small) − 1; mean over t of |std − 1| = |eps_pred_std − 1| averaged over every t from t_small to T "
        f"(linear between probed t). Per arm: mean over seeds ± {confidence:.0%} Student-t CI (df = n − 1). A part is reproduced "
        f"when its CI lies beyond the tolerance (bias > {_num(bias_tol)}"
        + (": 3 standard errors of the mean of the digits probe's 11,520 noise values" if bias_tol == BIAS_TOL else "")
        + f"; std departures beyond ±{_num(std_tol)}), not reproduced when it lies within it, else inconclusive; "
        "the arm's verdict is reproduced when all three parts are, partly reproduced when some are.",
        [Column("bias", "largest |bias|", "check"), Column("bias_t", "at t", "t"),
         Column("bias_signed", "bias there (signed)", "shown", signed=True), Column("t_small", "t_small", "t"),
         Column("std_small", "std − 1 at t_small", "check", signed=True), Column("std_over_t", "mean over t of |std − 1|", "check")],
        results, baseline, _sentence("F2", "predicted noise departing from mean 0 and std 1", results, baseline, details), per_run)


def finding_f3(runs: pd.DataFrame, quality: pd.DataFrame, arms: Sequence[str] | None = None,
               baseline: str | None = None, confidence: float = CONFIDENCE, gap_tol: float = GAP_TOL) -> Finding:
    per_run = f3_per_run(quality, runs)
    results = []
    for arm in _arm_order(arms, runs):
        mean_gap = estimate(per_run, arm, "final_mean_gap", confidence)
        sat_gap = estimate(per_run, arm, "sat_gap", confidence)
        checks = {
            "final_mean_gap": Check("final_mean_gap", "final mean gap", mean_gap, gap_tol,
                                    *judge_departure(mean_gap, gap_tol, "darker", "brighter")),
            "sat_gap": Check("sat_gap", "saturation gap", sat_gap, gap_tol,
                             *judge_departure(sat_gap, gap_tol, "less saturated", "more saturated")),
        }
        results.append(ArmResult(
            arm, max(mean_gap.n, sat_gap.n), checks,
            {"sat_frac": estimate(per_run, arm, "sat_frac", confidence),
             "ref_sat_frac": estimate(per_run, arm, "ref_sat_frac", confidence)},
            {}, combine([c.status for c in checks.values()])))
    baseline = _baseline(baseline, results)

    def details(arm: ArmResult) -> str:
        return f"{describe(arm.checks['final_mean_gap'], signed=True)}, {describe(arm.checks['sat_gap'], signed=True)}"

    return Finding(
        "F3", "the final sample mean and saturated fraction departing from the data's",
        "Per run: final mean gap = mean pixel of the final samples − mean pixel of the held-out data (negative = darker); "
        "saturation gap = sat_frac − ref_sat_frac, the fraction of pixels with |x| ≥ 0.99 in the samples minus in the data. "
        f"Per arm: mean over seeds ± {confidence:.0%} Student-t CI (df = n − 1). A gap is reproduced (darker / brighter, "
        f"more / less saturated) when its CI lies outside ±{_num(gap_tol)}, not reproduced when inside, else inconclusive; "
        "the arm's verdict is reproduced when both gaps are, partly reproduced when one is.",
        [Column("final_mean_gap", "final mean gap", "check", signed=True), Column("sat_frac", "sat_frac (samples)", "shown"),
         Column("ref_sat_frac", "ref_sat_frac (data)", "shown"), Column("sat_gap", "saturation gap", "check", signed=True)],
        results, baseline, _sentence("F3", "samples departing from the data's mean and saturation", results, baseline, details), per_run)


def _baseline(baseline: str | None, results: list[ArmResult]) -> str | None:
    names = [r.arm for r in results]
    if baseline in names:
        return baseline
    return names[0] if names else None


def compute_findings(runs: pd.DataFrame, per_t: pd.DataFrame, quality: pd.DataFrame,
                     arms: Sequence[str] | None = None, baseline: str | None = None) -> list[Finding]:
    """F1, F2 and F3 over the study's tables. ``arms`` gives the display order (default: the
    order of the runs table); ``baseline`` the arm of the overall sentences (default: the
    first arm)."""
    return [finding_f1(runs, per_t, arms, baseline), finding_f2(runs, per_t, arms, baseline),
            finding_f3(runs, quality, arms, baseline)]
