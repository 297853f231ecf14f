"""Declared hypotheses against hand-computed answers: intervals from scipy.stats.t directly,
p-values from scipy.stats.ttest_1samp, Holm from a plain loop."""

import math

import numpy as np
import pandas as pd
import pytest
from handmade import HYPOTHESES_COLUMNS
from pydantic import ValidationError
from scipy import stats as scipy_stats

from harness.study.hypotheses import (
    Hypothesis,
    Judgement,
    evaluate,
    holm,
    judge,
    metric_scale,
    paired_differences,
    sentence,
    within_p_values,
)
from harness.study.stats import mean_ci, paired_effect

COLUMNS = HYPOTHESES_COLUMNS

RISING = [1.0, 1.2, 1.4, 1.6]  # mean 1.3, sample std sqrt(0.2/3), n 4
CENTRED = [-0.15, -0.05, 0.05, 0.15]  # mean 0, sample std sqrt(0.05/3), n 4


def t_interval(values, confidence=0.95):
    """The two-sided Student-t interval, written out from scipy.stats.t."""
    x = np.asarray(values, dtype=float)
    n = x.size
    half = scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return x.mean() - half, x.mean() + half


def one_sided(values, popmean, alternative):
    return scipy_stats.ttest_1samp(values, popmean, alternative=alternative).pvalue


def tost_in(values, m):
    """TOST, doubled: both one-sided nulls (mean <= -m, mean >= m) must be rejected."""
    return min(1.0, 2 * max(one_sided(values, -m, "greater"), one_sided(values, m, "less")))


def tost_out(values, m):
    """Beyond the margin, doubled: reject mean <= m or mean >= -m."""
    return min(1.0, 2 * min(one_sided(values, m, "greater"), one_sided(values, -m, "less")))


# ---------------------------------------------------------------- hand-checked intervals


def test_rising_interval_by_hand():
    low, high = t_interval(RISING)
    # t_{0.975, 3} = 3.182446, std = sqrt(0.2/3) = 0.258199: half-width 0.410852
    assert (low, high) == pytest.approx((1.3 - 0.4108515, 1.3 + 0.4108515), abs=1e-6)
    j = judge(RISING, "above", 0.0)
    assert isinstance(j, Judgement)
    assert j.n == 4 and j.estimate == pytest.approx(1.3)
    assert (j.ci_low, j.ci_high) == pytest.approx((low, high))


@pytest.mark.parametrize(
    "expect, value, verdict",
    [
        ("above", 0.0, "supported"),  # CI (0.889, 1.711) wholly above 0
        ("above", 2.0, "refuted"),  # wholly below 2
        ("above", 1.0, "inconclusive"),  # contains 1
        ("below", 2.0, "supported"),
        ("below", 0.0, "refuted"),
        ("below", 1.0, "inconclusive"),
        ("above", 1.7, "inconclusive"),  # contains 1.7 (high end 1.711)
        ("below", 0.9, "inconclusive"),  # contains 0.9 (low end 0.889)
        ("above", 0.88, "supported"),  # just below the low end 0.889
        ("below", 1.72, "supported"),  # just above the high end 1.711
    ],
)
def test_above_below_verdicts_and_p(expect, value, verdict):
    j = judge(RISING, expect, value)
    assert j.verdict == verdict
    assert (j.ci_low, j.ci_high) == pytest.approx(t_interval(RISING))
    assert j.p_value == pytest.approx(scipy_stats.ttest_1samp(RISING, value).pvalue, rel=1e-9)
    assert (j.p_value < 0.05) == (verdict != "inconclusive")


@pytest.mark.parametrize(
    "values, margin, verdict",
    [
        (CENTRED, 0.3, "supported"),  # CI (-0.205, 0.205) inside (-0.3, 0.3)
        (CENTRED, 0.1, "inconclusive"),  # CI straddles both edges
        ([v + 0.2 for v in CENTRED], 0.3, "inconclusive"),  # CI (-0.005, 0.405) straddles +0.3
        (RISING, 0.5, "refuted"),  # CI (0.889, 1.711) wholly above +0.5
        ([-v for v in RISING], 0.5, "refuted"),  # wholly below -0.5
        (RISING, 1.0, "inconclusive"),  # straddles +1.0
        (RISING, 2.0, "supported"),  # wholly inside (-2, 2)
    ],
)
def test_within_verdicts_and_tost_p(values, margin, verdict):
    low, high = t_interval(values)
    j = judge(values, "within", margin)
    assert j.verdict == verdict
    assert (j.ci_low, j.ci_high) == pytest.approx((low, high))
    p_in, p_out = tost_in(values, margin), tost_out(values, margin)
    assert j.p_value == pytest.approx(min(p_in, p_out), rel=1e-9)
    if verdict == "supported":
        assert p_in < 0.05 <= p_out and j.p_value == pytest.approx(p_in)
    elif verdict == "refuted":
        assert p_out < 0.05 <= p_in and j.p_value == pytest.approx(p_out)
    else:
        assert j.p_value >= 0.05


def test_within_tost_by_hand():
    """CENTRED within 0.3: t = (0 + 0.3)/se for the lower test, se = sqrt(0.05/3)/2."""
    se = math.sqrt(0.05 / 3) / 2
    p_one = scipy_stats.t.sf(0.3 / se, 3)  # both one-sided p-values are equal by symmetry
    j = judge(CENTRED, "within", 0.3)
    assert j.p_value == pytest.approx(2 * p_one)
    assert j.estimate == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------- CI rule == p < alpha


def ci_verdict(values, expect, v, confidence):
    low, high = t_interval(values, confidence)
    if expect == "within":
        if -v < low and high < v:
            return "supported"
        if low > v or high < -v:
            return "refuted"
        return "inconclusive"
    if low > v:
        return "supported" if expect == "above" else "refuted"
    if high < v:
        return "refuted" if expect == "above" else "supported"
    return "inconclusive"


def p_verdict(j, expect, v, alpha):
    if not j.p_value < alpha:
        return "inconclusive"
    if expect == "within":
        return "supported" if abs(j.estimate) < v else "refuted"
    went_above = j.estimate > v
    return "supported" if went_above == (expect == "above") else "refuted"


@pytest.mark.parametrize("confidence", [0.95, 0.90])
@pytest.mark.parametrize("expect", ["above", "below", "within"])
def test_ci_rule_equals_p_rule_on_random_draws(expect, confidence):
    rng = np.random.default_rng({"above": 1, "below": 2, "within": 3}[expect] + int(confidence * 100))
    counts = {"supported": 0, "refuted": 0, "inconclusive": 0}
    for _ in range(400):
        n = int(rng.integers(2, 9))
        scale = float(rng.choice([0.01, 0.1, 1.0, 10.0]))
        threshold = float(rng.uniform(0.2, 2.0)) * scale
        # centres near the threshold (and for within, near both edges and the middle)
        centre = threshold * float(rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 3.0]))
        values = rng.normal(centre, scale * float(rng.uniform(0.05, 1.0)), size=n)
        j = judge(values, expect, threshold, confidence=confidence)
        by_ci = ci_verdict(values, expect, threshold, confidence)
        by_p = p_verdict(j, expect, threshold, 1 - confidence)
        assert j.verdict == by_ci == by_p, (values.tolist(), threshold, j)
        counts[j.verdict] += 1
    assert min(counts.values()) >= 30, counts  # every outcome was exercised


# ---------------------------------------------------------------- zero-width intervals


def test_zero_width_interval_of_an_exact_metric_is_decided_by_its_value():
    """A prior term no seed changes: identical values in every seed, exact by construction."""
    prior = [0.544, 0.544, 0.544]
    j = judge(prior, "above", 0.0, exact=True)
    assert j == Judgement(3, pytest.approx(0.544), pytest.approx(0.544), pytest.approx(0.544), 0.0, "supported")
    assert j.ci_low == j.ci_high == j.estimate
    assert judge(prior, "below", 0.0, exact=True).verdict == "refuted"
    assert judge(prior, "below", 0.0, exact=True).p_value == 0.0
    assert judge(prior, "above", 1.0, exact=True).verdict == "refuted"
    assert judge(prior, "within", 1.0, exact=True).verdict == "supported"
    assert judge(prior, "within", 1.0, exact=True).p_value == 0.0
    assert judge(prior, "within", 0.5, exact=True).verdict == "refuted"
    assert judge([-0.544] * 2, "within", 0.5, exact=True).verdict == "refuted"


def test_no_spread_in_an_estimated_metric_is_judged_by_the_sign_test():
    """Seeds that agree on a discrete metric are not a zero-width interval: p = 2 * 0.5^n."""
    for n, decided in ((2, False), (5, False), (6, True)):
        j = judge([1.0] * n, "above", 0.5)
        assert j.p_value == pytest.approx(2 * 0.5**n)
        assert j.verdict == ("supported" if decided else "inconclusive")
        assert (j.n, j.estimate) == (n, 1.0) and math.isnan(j.ci_low) and math.isnan(j.ci_high)
    assert judge([1.0] * 6, "below", 0.5).verdict == "refuted"
    assert judge([0.2] * 7, "within", 0.5).verdict == "supported"
    assert judge([0.2] * 7, "within", 0.5).p_value == pytest.approx(2 * 0.5**7)
    assert judge([-0.7] * 7, "within", 0.5).verdict == "refuted"
    assert (judge([0.5] * 7, "within", 0.5).verdict, judge([0.5] * 7, "within", 0.5).p_value) == ("inconclusive", 1.0)


def test_registry_decides_exact_versus_estimated():
    assert metric_scale("prior_bits") == ("linear", True)
    assert metric_scale("coverage") == ("linear", False)
    assert metric_scale("heldout_loss") == ("log", False)
    assert metric_scale("not_declared") == ("linear", False)
    # through evaluate: the same all-equal paired differences, exact or not
    per_run = runs({"base": {0: 1.0, 1: 1.0}, "A": {0: 1.5, 1: 1.5}})
    for metric, p in (("prior_bits", 0.0), ("coverage", 0.5)):
        h = {"h": Hypothesis(metric=metric, arm="A", versus="baseline", expect="above")}
        out = evaluate(h, per_run.rename(columns={"m": metric}), ["base", "A"], "base")
        assert out.p_value[0] == p, metric
    assert "every seed equal: no t interval, judged by the sign test" in out.sentence[0]


def two_valued_false_verdicts(studies: int, seeds: int, rng) -> float:
    """Null studies of one estimated, two-valued metric: paired differences +-a with probability
    1/2 each (a coverage that moves by one class), judged against 0."""
    h = {"h": Hypothesis(metric="coverage", arm="A", versus="baseline", expect="above")}
    wrong = 0
    for _ in range(studies):
        base = rng.choice([0.8, 0.9], size=seeds)
        arm = base + rng.choice([-0.1, 0.1], size=seeds)
        per_run = runs({"base": dict(enumerate(base)), "A": dict(enumerate(arm))}).rename(columns={"m": "coverage"})
        wrong += evaluate(h, per_run, ["base", "A"], "base").verdict[0] != "inconclusive"
    return wrong / studies


def test_two_valued_metric_on_its_null_keeps_false_verdicts_at_five_percent(monkeypatch):
    rng = np.random.default_rng(11)
    # at 2 to 6 seeds; from 7 on the t test itself misjudges a two-valued metric (7 of 8 seeds
    # on one side: t = 3.0, p = 0.02, exact probability 0.07), a limit of the t test that the
    # zero-spread rule does not address (docs/design.md)
    for seeds in (2, 3, 4, 5, 6):
        rate = two_valued_false_verdicts(400, seeds, rng)
        assert rate <= 0.05, (seeds, rate)
    # the old rule (a zero-width interval decided by its value, p = 0) fails this simulation
    monkeypatch.setattr("harness.study.hypotheses.metric_scale", lambda metric: ("linear", True))
    assert two_valued_false_verdicts(400, 2, np.random.default_rng(11)) > 0.3


def test_floating_point_noise_counts_as_zero_width():
    j = judge([1.0, 1.0 + 2.2e-16, 1.0], "above", 0.5, exact=True)
    assert (j.verdict, j.p_value) == ("supported", 0.0)
    assert j.ci_low == j.ci_high == j.estimate
    j = judge([0.0, 1e-14, 0.0], "above", 0.0, exact=True)  # noise around the threshold itself
    assert (j.verdict, j.p_value) == ("inconclusive", 1.0)
    assert j.ci_low == j.ci_high
    # estimated: the noise is no spread either, so the sign test, not a t interval of width 1e-16
    j = judge([1.0, 1.0 + 2.2e-16, 1.0], "above", 0.5)
    assert (j.verdict, j.p_value) == ("inconclusive", 0.25)
    # a real (if small) spread is not noise: the t test decides
    j = judge([1.0, 1.001, 1.002], "above", 0.5)
    assert j.ci_low < j.ci_high and 0 < j.p_value < 0.05


# ---------------------------------------------------------------- n = 0, n = 1, NaN


def test_nan_and_inf_are_dropped():
    assert judge([1.0, 2.0, 3.0, float("nan"), float("inf"), None], "above", 0.0) == judge(
        [1.0, 2.0, 3.0], "above", 0.0
    )


def test_single_value_has_no_interval():
    j = judge([2.0, float("nan"), float("-inf")], "above", 0.0)
    assert (j.n, j.estimate, j.verdict) == (1, 2.0, "inconclusive")
    assert math.isnan(j.ci_low) and math.isnan(j.ci_high) and math.isnan(j.p_value)


def test_no_value_is_all_nan():
    for values in ([], [float("nan")]):
        j = judge(values, "within", 1.0)
        assert (j.n, j.verdict) == (0, "inconclusive")
        assert all(math.isnan(x) for x in (j.estimate, j.ci_low, j.ci_high, j.p_value))


def test_judge_rejects_bad_expect_and_margin():
    with pytest.raises(ValueError):
        judge([1.0, 2.0], "greater", 0.0)
    with pytest.raises(ValueError, match="within needs a margin value > 0"):
        judge([1.0, 2.0], "within", 0.0)


# ---------------------------------------------------------------- the model


def test_hypothesis_model():
    h = Hypothesis(metric="prior_bits", expect="above")
    assert (h.arm, h.versus, h.value, h.says) == (None, "none", 0.0, "")
    h = Hypothesis.model_validate({"metric": "m", "arm": "A", "versus": "baseline", "expect": "within", "value": 1})
    assert h.value == 1.0 and isinstance(h.value, float)
    with pytest.raises(ValidationError, match="within needs a margin value > 0"):
        Hypothesis(metric="m", expect="within")
    with pytest.raises(ValidationError, match="within needs a margin value > 0"):
        Hypothesis(metric="m", expect="within", value=-0.1)
    with pytest.raises(ValidationError, match="extra"):
        Hypothesis(metric="m", expect="above", threshold=1.0)
    with pytest.raises(ValidationError):
        Hypothesis(metric="m", expect="greater")
    with pytest.raises(ValidationError):
        Hypothesis(metric="m", expect="above", versus="control")
    with pytest.raises(ValidationError):
        Hypothesis(metric="m")  # expect is required


# ---------------------------------------------------------------- Holm


def holm_by_hand(p):
    """A plain loop over the sorted finite p-values."""
    finite = sorted((v, i) for i, v in enumerate(p) if math.isfinite(v))
    m = len(finite)
    out = [math.nan] * len(p)
    running = 0.0
    for j, (v, i) in enumerate(finite, start=1):
        running = max(running, min(1.0, (m - j + 1) * v))
        out[i] = running
    return out


def test_holm_known_answer():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])  # the larger p keeps its own 0.04
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]
    assert holm([]) == []


def test_holm_leaves_nan_out_of_m():
    out = holm([0.01, float("nan"), 0.02, None])
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)  # m = 2, not 4
    assert math.isnan(out[1]) and math.isnan(out[3])


def test_holm_equals_manual_loop_on_random_p():
    rng = np.random.default_rng(7)
    for _ in range(200):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 12))).tolist()
        if rng.random() < 0.3:
            p[int(rng.integers(len(p)))] = math.nan
        if rng.random() < 0.3:
            p.append(p[0])  # ties
        got, want = holm(p), holm_by_hand(p)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w)


# ---------------------------------------------------------------- evaluate


def values_with_p(p, d=1.0):
    """Three values a - d, a, a + d whose one-sample t test against 0 has two-sided p."""
    a = scipy_stats.t.isf(p / 2, 2) * d / math.sqrt(3)
    return [a - d, a, a + d]


def runs(values_by_arm):
    """per_run rows from {arm: {seed: value}} for the metric ``m``."""
    return pd.DataFrame(
        [{"arm": arm, "seed": seed, "m": v} for arm, by_seed in values_by_arm.items() for seed, v in by_seed.items()]
    )


def test_holm_takes_away_a_verdict():
    targets = {"A": 0.02, "B": 0.025, "C": 0.03, "D": 0.04}
    per_run = runs({arm: dict(enumerate(values_with_p(p))) for arm, p in targets.items()})
    for arm, p in targets.items():  # each row alone is supported
        j = judge(per_run.loc[per_run.arm == arm, "m"], "above", 0.0)
        assert j.verdict == "supported" and j.p_value == pytest.approx(p)
    all_arms = evaluate({"h": Hypothesis(metric="m", expect="above")}, per_run, list(targets), None)
    assert list(all_arms.arm) == list(targets)
    assert all_arms.p_value.tolist() == pytest.approx(list(targets.values()))
    # Holm: 4 * 0.02 = 0.08 is the smallest adjusted p; the running max keeps all at 0.08
    assert all_arms.p_adjusted.tolist() == pytest.approx([0.08] * 4)
    assert (all_arms.verdict == "inconclusive").all()
    alone = evaluate({"h": Hypothesis(metric="m", arm="A", expect="above")}, per_run, list(targets), None)
    assert alone.verdict.tolist() == ["supported"]
    assert alone.p_adjusted[0] == pytest.approx(alone.p_value[0]) == pytest.approx(0.02)


def test_holm_counts_every_row_of_the_study():
    """Two hypotheses over the same arm: m = 2 although each hypothesis has one row."""
    per_run = runs({"A": dict(enumerate(values_with_p(0.03)))})
    hs = {
        "up": Hypothesis(metric="m", arm="A", expect="above"),
        "down": Hypothesis(metric="m", arm="A", expect="below"),
    }
    out = evaluate(hs, per_run, ["A"], None)
    assert out.p_value.tolist() == pytest.approx([0.03, 0.03])
    assert out.p_adjusted.tolist() == pytest.approx([0.06, 0.06])
    assert out.verdict.tolist() == ["inconclusive", "inconclusive"]
    # with a looser alpha both verdicts stand: supported and refuted
    loose = evaluate(hs, per_run, ["A"], None, alpha=0.1)
    assert loose.verdict.tolist() == ["supported", "refuted"]


PAIRED = {
    "base": {0: 1.0, 1: 2.0, 2: 3.0},
    "A": {0: 1.5, 1: 2.7, 2: 3.4, 3: 100.0},  # seed 3 has no baseline: dropped
    "B": {0: 1.2, 1: 2.2, 2: 3.2},  # +0.2 in every seed, up to rounding
}


def test_versus_baseline_pairs_by_seed_and_skips_the_baseline():
    h = {"up": Hypothesis(metric="m", versus="baseline", expect="above")}
    out = evaluate(h, runs(PAIRED), ["base", "A", "B"], "base")
    assert list(out.columns[: len(COLUMNS)]) == COLUMNS
    assert out.arm.tolist() == ["A", "B"]
    a, b = out.iloc[0], out.iloc[1]
    diffs = [0.5, 0.7, 0.4]
    assert a.n == 3 and a.estimate == pytest.approx(np.mean(diffs))
    assert (a.ci_low, a.ci_high) == pytest.approx(t_interval(diffs))
    assert a.p_value == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
    # B - base is 0.2 in every seed: "m" is no exact metric, so the sign test, p = 2 * 0.5^3
    assert (b.n, b.p_value, b.verdict) == (3, 0.25, "inconclusive") and math.isnan(b.ci_low)
    assert b.estimate == pytest.approx(0.2)
    # A: CI (0.154, 0.913), p = 0.0263; Holm over 2 rows: 0.0525
    assert a.p_adjusted == pytest.approx(2 * a.p_value) and a.verdict == "inconclusive"
    # the same numbers as an exact metric: B's zero-width interval is decided by its value
    h = {"up": Hypothesis(metric="prior_bits", versus="baseline", expect="above")}
    out = evaluate(h, runs(PAIRED).rename(columns={"m": "prior_bits"}), ["base", "A", "B"], "base")
    a, b = out.iloc[0], out.iloc[1]
    assert (b.n, b.ci_low, b.ci_high, b.p_value, b.verdict) == (3, b.estimate, b.estimate, 0.0, "supported")
    assert a.verdict == "supported" and a.p_adjusted == pytest.approx(a.p_value)  # Holm: 1 x 0.0263


def test_versus_none_uses_the_arm_itself_and_every_arm():
    h = {"pos": Hypothesis(metric="m", expect="above", value=1.5)}
    out = evaluate(h, runs(PAIRED), ["base", "A", "B"], "base")
    assert out.arm.tolist() == ["base", "A", "B"]
    assert out.n.tolist() == [3, 4, 3]
    assert out.estimate.tolist() == pytest.approx([2.0, np.mean([1.5, 2.7, 3.4, 100.0]), 2.2])


def test_pairing_rounding_rule_matches_stats():
    base = {0: 0.3, 1: 0.6, 2: 0.7}
    arm = {0: 0.1 + 0.2, 1: 0.2 + 0.4, 2: 0.1 + 0.6}  # equal values by other arithmetic
    assert [a - base[s] for s, a in arm.items()] != [0.0, 0.0, 0.0]
    assert paired_differences(arm, base) == [0.0, 0.0, 0.0]
    other = {0: 1.5, 1: 2.7, 2: float("nan"), 5: 4.0}
    assert mean_ci(paired_differences(other, PAIRED["base"])) == paired_effect(other, PAIRED["base"])
    out = evaluate(
        {"same": Hypothesis(metric="m", arm="A", versus="baseline", expect="above")},
        runs({"base": base, "A": arm}),
        ["base", "A"],
        "base",
    )
    assert (out.n[0], out.estimate[0], out.p_value[0], out.verdict[0]) == (3, 0.0, 1.0, "inconclusive")


def test_nan_values_in_runs_are_dropped_before_pairing():
    data = {"base": {0: 1.0, 1: float("nan"), 2: 3.0}, "A": {0: 1.5, 1: 2.7, 2: 3.4}}
    out = evaluate({"h": Hypothesis(metric="m", versus="baseline", expect="above")}, runs(data), ["base", "A"], "base")
    assert out.n.tolist() == [2]
    assert out.estimate[0] == pytest.approx(0.45)


def test_missing_metric_or_baseline_gives_an_empty_row():
    per_run = runs(PAIRED)
    hs = {
        "gone": Hypothesis(metric="fid", arm="A", expect="below", value=10.0),
        "nobase": Hypothesis(metric="m", arm="A", versus="baseline", expect="above"),
        "ok": Hypothesis(metric="m", arm="A", expect="above"),
    }
    out = evaluate(hs, per_run, ["base", "A", "B"], None)
    assert out.name.tolist() == ["gone", "nobase", "ok"]
    assert out.n.tolist() == [0, 0, 4]
    assert out.verdict.tolist()[:2] == ["inconclusive", "inconclusive"]
    for col in ("estimate", "ci_low", "ci_high", "p_value", "p_adjusted"):
        assert out[col][:2].isna().all()
    assert out.sentence[0] == "A: fid: no finished run with this metric, expected below 10: inconclusive."
    # an unknown arm label has no run either
    lost = evaluate({"x": Hypothesis(metric="m", arm="Z", expect="above")}, per_run, ["base"], "base")
    assert (lost.n[0], lost.verdict[0]) == (0, "inconclusive")


def test_evaluate_with_no_hypotheses_has_the_columns():
    out = evaluate({}, runs(PAIRED), ["base"], "base")
    assert out.empty and list(out.columns[: len(COLUMNS)]) == COLUMNS


# ---------------------------------------------------------------- sentences


def test_sentence_of_the_prior_term_example():
    per_run = runs({"baseline": {0: 0.1, 1: 0.2}, "T200-fixed": {0: 0.644, 1: 0.744}}).rename(
        columns={"m": "prior_bits"}
    )
    h = Hypothesis(
        metric="prior_bits",
        arm="T200-fixed",
        versus="baseline",
        expect="above",
        says="T=200 with unscaled betas leaves signal in x_T",
    )
    out = evaluate({"t200_fixed_leaks_signal": h}, per_run, ["baseline", "T200-fixed"], "baseline")
    assert out.sentence[0] == (
        "T=200 with unscaled betas leaves signal in x_T — T200-fixed: prior_bits − baseline = +0.544 "
        "(95% CI 0.544 to 0.544, n=2), expected above 0: supported (Holm-adjusted p = 0.0)."
    )
    assert out.says[0] == h.says
    bare = evaluate({"t": h.model_copy(update={"says": ""})}, per_run, ["baseline", "T200-fixed"], "baseline")
    assert bare.sentence[0] == (
        "T200-fixed: prior_bits − baseline = +0.544 (95% CI 0.544 to 0.544, n=2), "
        "expected above 0: supported (Holm-adjusted p = 0.0)."
    )
    assert sentence(bare.iloc[0]) == bare.sentence[0]


def row(**kw):
    base = {
        "name": "h",
        "arm": "T1000",
        "metric": "loss_small_minus_mid",
        "versus": "none",
        "expect": "above",
        "value": 0.0,
        "n": 3,
        "estimate": 0.62,
        "ci_low": 0.51234,
        "ci_high": 0.72766,
        "p_value": 0.004,
        "p_adjusted": 0.012,
        "verdict": "supported",
        "says": "",
    }
    base.update(kw)
    return base


def test_sentence_versus_none():
    assert sentence(row()) == (
        "T1000: loss_small_minus_mid = 0.62 (95% CI 0.512 to 0.728, n=3), expected above 0: "
        "supported (Holm-adjusted p = 0.012)."
    )


def test_sentence_within_and_negative_difference():
    text = sentence(
        row(
            versus="baseline",
            metric="fid",
            expect="within",
            value=0.01,
            estimate=-0.004567,
            ci_low=-0.0081234,
            ci_high=-0.00099,
            p_adjusted=0.2,
            verdict="inconclusive",
        )
    )
    assert text == (
        "T1000: fid − baseline = -0.00457 (95% CI -0.00812 to -0.00099, n=3), expected within ±0.01: "
        "inconclusive (Holm-adjusted p = 0.2)."
    )


def test_sentence_below_refuted_with_says_and_p_one():
    text = sentence(
        row(
            expect="below",
            value=1.5,
            estimate=12345.6,
            ci_low=12000.0,
            ci_high=12691.2,
            p_adjusted=1.0,
            verdict="refuted",
            says="fewer steps help",
        )
    )
    assert text == (
        "fewer steps help — T1000: loss_small_minus_mid = 1.23e+04 (95% CI 1.2e+04 to 1.27e+04, n=3), "
        "expected below 1.5: refuted (Holm-adjusted p = 1.0)."
    )


def test_sentence_single_run_and_no_run():
    nan = float("nan")
    one = row(
        metric="fid",
        n=1,
        estimate=12.34,
        ci_low=nan,
        ci_high=nan,
        p_value=nan,
        p_adjusted=nan,
        verdict="inconclusive",
        expect="below",
        value=15.0,
    )
    assert sentence(one) == "T1000: fid = 12.3 (n=1, no interval), expected below 15: inconclusive."
    none = row(
        metric="fid",
        versus="baseline",
        n=0,
        estimate=nan,
        ci_low=nan,
        ci_high=nan,
        p_value=nan,
        p_adjusted=nan,
        verdict="inconclusive",
        expect="below",
        value=0.0,
    )
    assert sentence(none) == "T1000: fid − baseline: no finished run with this metric, expected below 0: inconclusive."


def test_sentence_uses_the_confidence_level():
    assert "(90% CI 0.512 to 0.728, n=3)" in sentence(row(), confidence=0.90)
    per_run = runs({"A": dict(enumerate(RISING))})
    out = evaluate({"h": Hypothesis(metric="m", expect="above")}, per_run, ["A"], None, confidence=0.9)
    assert "(90% CI " in out.sentence[0]
    assert (out.ci_low[0], out.ci_high[0]) == pytest.approx(t_interval(RISING, 0.9))


# ---------------------------------------------------------------- log-scale metrics


def lognormal_false_verdicts(studies: int, threshold: float, rng, versus: str = "none") -> float:
    """Null studies of a positive, skewed metric (fd, declared log scale): lognormal values
    with sigma 1.5 over 3 seeds; versus none the claim sits on ``threshold``, versus the
    baseline both arms have the same law (a true ratio of 1)."""
    h = {"h": Hypothesis(metric="fd", arm="A", versus=versus, expect="above", value=threshold)}
    wrong = 0
    for _ in range(studies):
        values = {arm: dict(enumerate(np.exp(rng.normal(0.0, 1.5, size=3)))) for arm in ("base", "A")}
        per_run = runs(values).rename(columns={"m": "fd"})
        wrong += evaluate(h, per_run, ["base", "A"], "base").verdict[0] != "inconclusive"
    return wrong / studies


def test_lognormal_metric_is_judged_on_logs_and_keeps_false_verdicts_at_five_percent(monkeypatch):
    # on logs the claim is about the median (the geometric mean), e^0 = 1, and the t test on
    # normal log values is exact: 5% up to the simulation's error (3 standard errors allowed)
    allowed = 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)
    assert lognormal_false_verdicts(1000, 1.0, np.random.default_rng(5)) <= allowed
    assert lognormal_false_verdicts(1000, 0.0, np.random.default_rng(6), versus="baseline") <= allowed
    # judged on the raw values against their true mean e^(1.5^2 / 2), the t test is misled by the skew
    monkeypatch.setattr("harness.study.hypotheses.metric_scale", lambda metric: ("linear", False))
    assert lognormal_false_verdicts(1000, math.exp(1.5**2 / 2), np.random.default_rng(5)) > 0.1


def test_log_metric_rows_show_ratios_and_geometric_means():
    base = {0: 1.0, 1: 2.0, 2: 4.0}
    arm = {0: 0.9, 1: 1.82, 2: 3.62}  # ratios 0.9, 0.91, 0.905
    per_run = runs({"base": base, "A": arm}).rename(columns={"m": "heldout_loss"})
    hs = {
        "lower": Hypothesis(metric="heldout_loss", arm="A", versus="baseline", expect="below"),
        "close": Hypothesis(metric="heldout_loss", arm="A", versus="baseline", expect="within", value=0.2),
        "own": Hypothesis(metric="heldout_loss", arm="base", expect="below", value=10.0),
    }
    out = evaluate(hs, per_run, ["base", "A"], "base").set_index("name")
    logs = np.log([0.9, 0.91, 0.905])
    low, high = t_interval(logs)
    lower = out.loc["lower"]
    assert lower.scale == "log"
    assert lower.estimate == pytest.approx(math.exp(logs.mean()))
    assert (lower.ci_low, lower.ci_high) == pytest.approx((math.exp(low), math.exp(high)))
    assert lower.p_value == pytest.approx(scipy_stats.ttest_1samp(logs, 0.0).pvalue)
    assert lower.verdict == "supported"
    assert "heldout_loss ratio arm/baseline = 0.905 (95% CI" in lower.sentence
    assert "expected ratio below 1: supported" in lower.sentence
    # within 0.2: the ratio between 1/1.2 and 1.2, TOST on the log ratios against +-log 1.2
    assert out.loc["close"].p_value == pytest.approx(
        min(within_p_values(logs.mean(), logs.std(ddof=1) / math.sqrt(3), 3, math.log(1.2)))
    )
    assert "expected ratio within 0.833 to 1.2" in out.loc["close"].sentence
    own = out.loc["own"]
    assert own.estimate == pytest.approx(2.0)  # geometric mean of 1, 2, 4
    assert "heldout_loss geometric mean = 2 (95% CI" in own.sentence
    with pytest.raises(ValueError, match="threshold must be > 0"):
        evaluate({"bad": Hypothesis(metric="fd", expect="below", value=0.0)}, per_run, ["base", "A"], "base")


def _shortfall_verdicts(clip: bool, seeds: int = 8, studies: int = 400) -> float:
    """The fraction of null studies in which "shortfall_t_small above 0" is called supported
    when the model is exactly as good as the best reference at the smallest t: both losses
    are estimates on a probe draw, so their per-seed difference is noise around 0. The
    difference goes through the engine's own per_t_summary, clipped at 0 as it was before
    2026-12-07 when ``clip``."""
    from ddpm_engine.metrics import per_t_summary

    rng = np.random.default_rng(11)
    supported = 0
    for _ in range(studies):
        values = []
        for _ in range(seeds):
            model, reference = 0.40 + rng.normal(0, 0.01), 0.40 + rng.normal(0, 0.01)
            rows = pd.DataFrame({"t": [1, 10], "loss_mse": [model, 0.1], "loss_best_ref": [reference, 0.1]})
            shortfall = per_t_summary(rows)["shortfall_t_small"]
            values.append(max(0.0, shortfall) if clip else shortfall)
        supported += judge(values, "above", 0.0).verdict == "supported"
    return supported / studies


def test_signed_shortfall_keeps_a_model_at_the_reference_from_being_called_short():
    """Clipped at 0, every seed's shortfall is >= 0, so the mean sits above 0 and a model at the
    reference was called short of it in about a quarter of null studies at 8 seeds; signed, the
    t test holds its level (one side of a two-sided 5% test)."""
    assert _shortfall_verdicts(clip=True) > 0.15  # the simulation can fail a biased metric
    assert _shortfall_verdicts(clip=False) <= 0.04
