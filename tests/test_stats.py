"""The report's statistics against hand-computed answers."""

import math

import pytest
from scipy import stats as scipy_stats

from harness.study.stats import (
    HIGHER,
    LOWER,
    NO_CLEAR_EFFECT,
    best_arms,
    ci_excludes_zero,
    clear_best_arms,
    mean_ci,
    paired_effect,
    verdict,
)


def test_mean_ci_of_one_two_three():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    # sample std 1, so the half-width is t_{0.975, 2} * 1 / sqrt(3); t_{0.975, 2} = 4.302653
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert half == pytest.approx(scipy_stats.t.ppf(0.975, 2) / math.sqrt(3))


def test_mean_ci_drops_nan_and_handles_n1_and_empty():
    mean, half, n = mean_ci([5.0, float("nan"), None])
    assert (mean, n) == (5.0, 1) and math.isnan(half)
    mean, half, n = mean_ci([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)
    assert mean_ci([4.0, 4.0]) == (4.0, 0.0, 2)


def test_paired_effect_known_answer():
    arm = {0: 1.5, 1: 2.5, 2: 3.5, 7: 100.0}  # seed 7 has no baseline pair and is ignored
    base = {0: 1.0, 1: 2.0, 2: 2.0}
    diff, half, n = paired_effect(arm, base)
    # differences 0.5, 0.5, 1.5: mean 5/6, sample std sqrt(1/3)
    assert n == 3
    assert diff == pytest.approx(5 / 6)
    assert half == pytest.approx(4.302652729911275 * math.sqrt(1 / 3) / math.sqrt(3))
    assert ci_excludes_zero(diff, half) is False  # 0.833 +- 1.434 includes zero


def test_pairing_removes_shared_seed_noise():
    """Seed-to-seed spread is large, but the arm is lower on every seed by about 0.1:
    the paired CI excludes zero although the two arms' own CIs overlap."""
    base = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    arm = {0: 0.9, 1: 1.88, 2: 2.91, 3: 3.89}
    diff, half, n = paired_effect(arm, base)
    assert n == 4 and diff == pytest.approx(-0.105)
    assert ci_excludes_zero(diff, half)
    assert verdict(diff, half, n, LOWER) == "better"
    assert verdict(diff, half, n, HIGHER) == "worse"
    assert verdict(diff, half, n, None) == "lower"


def test_ci_including_zero_is_no_clear_effect():
    diff, half, n = paired_effect({0: 1.0, 1: 3.0, 2: 2.1}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert diff == pytest.approx(0.1 / 3) and half > abs(diff)
    assert verdict(diff, half, n, LOWER) == NO_CLEAR_EFFECT == "no clear effect"
    assert verdict(diff, half, n, HIGHER) == "no clear effect"


def test_single_pair_and_no_pair():
    diff, half, n = paired_effect({0: 3.0}, {0: 1.0})
    assert (diff, n) == (2.0, 1) and math.isnan(half)
    assert verdict(diff, half, n, LOWER) == "n=1, no interval"
    assert not ci_excludes_zero(diff, half)
    diff, half, n = paired_effect({0: 3.0}, {1: 1.0})
    assert n == 0 and verdict(diff, half, n, LOWER) == "no data"


def test_best_arms():
    means = {"a": 1.0, "b": 0.5, "c": float("nan"), "d": 0.5}
    assert best_arms(means, LOWER) == {"b", "d"}
    assert best_arms(means, HIGHER) == {"a"}
    assert best_arms(means, None) == set()
    assert best_arms({"a": 1.0, "b": float("nan")}, LOWER) == set()  # one arm: nothing to compare


def test_clear_best_arm_needs_a_clear_paired_lead_over_every_arm():
    base = {0: 10.0, 1: 12.0, 2: 14.0}
    sharp = {0: 8.0, 1: 9.9, 2: 12.1}  # lower than base by about 2 on every seed
    noisy = {0: 7.0, 1: 13.0, 2: 13.4}  # mean 11.1: above sharp's 10.0, but it wins on seed 0
    assert best_arms({"base": 12.0, "sharp": 10.0, "noisy": 11.13}, LOWER) == {"sharp"}
    assert clear_best_arms({"base": base, "sharp": sharp, "noisy": noisy}, LOWER) == set()
    assert clear_best_arms({"base": base, "sharp": sharp}, LOWER) == {"sharp"}
    assert clear_best_arms({"base": base, "sharp": sharp, "empty": {}}, LOWER) == {"sharp"}
    assert clear_best_arms({"base": base, "sharp": sharp}, None) == set()
    assert clear_best_arms({"a": {0: 1.0}, "b": {0: 2.0}}, LOWER) == set()  # one pair: no interval


def test_rounding_differences_are_no_effect():
    """0.1 + 0.2 - 0.3 is 5.6e-17, the same on every seed: a zero-width interval that would
    'exclude zero'. It is rounding, so the paired difference is exactly zero."""
    arm = {0: 0.1 + 0.2, 1: 0.1 + 0.2, 2: 0.1 + 0.2}
    base = {0: 0.3, 1: 0.3, 2: 0.3}
    diff, half, n = paired_effect(arm, base)
    assert (diff, half, n) == (0.0, 0.0, 3)
    assert verdict(diff, half, n, LOWER) == NO_CLEAR_EFFECT


def test_the_plan_warnings_t_table_matches_scipy():
    from harness.commands import T_975

    for n, value in T_975.items():
        assert value == pytest.approx(scipy_stats.t.ppf(0.975, n - 1), abs=5e-4)


def test_minimum_detectable_effect_is_the_exact_noncentral_t_solution():
    from harness.study.stats import minimum_detectable_effect

    assert minimum_detectable_effect(1.0, 2) == pytest.approx(11.55, abs=0.005)
    assert minimum_detectable_effect(2.0, 2) == pytest.approx(2 * 11.5499, rel=1e-4)  # in units of the sd
    # the normal shortcut (t_{1-a/2} + t_power) / sqrt(n) it replaces: 9.96 at n = 2, and 298
    # at Holm's first step over 33 cells, where the exact answer is 381
    shortcut = (scipy_stats.t.ppf(1 - 0.05 / 66, 1) + scipy_stats.t.ppf(0.8, 1)) / math.sqrt(2)
    assert shortcut == pytest.approx(298, abs=0.5)
    assert minimum_detectable_effect(1.0, 2, alpha=0.05 / 33) == pytest.approx(380.75, abs=0.05)
    assert math.isnan(minimum_detectable_effect(1.0, 1)) and math.isnan(minimum_detectable_effect(float("nan"), 5))


def test_minimum_detectable_effect_has_its_power_in_simulation():
    import numpy as np

    from harness.study.stats import minimum_detectable_effect

    rng = np.random.default_rng(1)
    for n, alpha in ((3, 0.05), (5, 0.01)):
        d = minimum_detectable_effect(1.0, n, alpha=alpha)
        x = rng.normal(d, 1.0, size=(40_000, n))
        t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
        power = float(np.mean(np.abs(t) > scipy_stats.t.ppf(1 - alpha / 2, n - 1)))
        assert power == pytest.approx(0.8, abs=0.01), (n, power)


def test_p_value_of_no_spread_is_the_sign_test_unless_exact():
    from harness.study.stats import p_value, sign_test_p

    assert p_value([0.1, 0.1], exact=True) == 0.0
    assert p_value([0.1, 0.1]) == 0.5 == sign_test_p([0.1, 0.1])
    assert p_value([0.1] * 6) == pytest.approx(2 * 0.5**6)
    assert p_value([0.0, 0.0]) == 1.0
    assert sign_test_p([1.0, 2.0, -1.0, 0.0]) == pytest.approx(1.0)  # 2 above, 1 below, a tie dropped
    assert sign_test_p([1.0] * 9 + [-1.0]) == pytest.approx(2 * scipy_stats.binom.cdf(1, 10, 0.5))
