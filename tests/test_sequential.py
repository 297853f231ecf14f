"""Adaptive seeds (harness.sequential): the spending, the seeds each look asks for, and null
studies simulated from hand-made tables showing the family-wise false-positive rate stays at
or under 5% while naive re-testing at every look does not, and that a planted effect is found."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.hypotheses import evaluate
from harness.sequential import look_levels, obrien_fleming_spent, seeds_wanted
from harness.spec import AdaptiveSeeds, Hypothesis

ARMS = ["base", "A", "B", "C"]
HYPOTHESES = {
    # paired against the baseline, judged for A, B and C
    "gap_above_zero": Hypothesis(metric="heldout_loss", versus="baseline", expect="above", value=0.0),
    # each arm's own value (all four arms)
    "fd_below_half": Hypothesis(metric="fd", expect="below", value=0.5),
}
ROWS = 3 + 4


def test_obrien_fleming_spending_matches_lan_demets_and_sums_to_alpha():
    z = stats.norm.ppf(0.975)
    assert obrien_fleming_spent(3 / 8) == pytest.approx(2 - 2 * stats.norm.cdf(z / math.sqrt(3 / 8)))
    assert obrien_fleming_spent(1.0) == 0.05
    levels = look_levels([3, 4, 5, 6, 7, 8])
    spends = [s for _, s in levels]
    assert [n for n, _ in levels] == [3, 4, 5, 6, 7, 8]
    assert sum(spends) == pytest.approx(0.05)
    assert all(a < b for a, b in zip(spends, spends[1:]))  # O'Brien-Fleming: early looks spend least
    assert spends[0] == pytest.approx(0.00137, abs=1e-5)
    assert look_levels([5]) == [(5, 0.05)]


def test_adaptive_seed_plan_looks():
    plan = AdaptiveSeeds(start=3, max=8)
    assert plan.looks == [3, 4, 5, 6, 7, 8] and plan.seeds == list(range(8))
    assert AdaptiveSeeds(start=3, max=8, batch=2, first=10).looks == [3, 5, 7, 8]
    assert AdaptiveSeeds(start=4, max=4).looks == [4]
    with pytest.raises(ValueError, match="at least start"):
        AdaptiveSeeds(start=5, max=4)


def per_run_table(values: dict[str, np.ndarray], seeds_of: dict[str, int], fd: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for arm in ARMS:
        for seed in range(seeds_of[arm]):
            rows.append({"arm": arm, "seed": seed, "heldout_loss": values[arm][seed], "fd": fd[arm][seed]})
    return pd.DataFrame(rows)


def simulate(rng, plan: AdaptiveSeeds, effect: float = 0.0, fd_mean: float = 0.5) -> pd.DataFrame:
    """One study under the adaptive procedure, from hand-made numbers: every (arm, seed) value is
    drawn up front (arms share a seed effect, as real seeds do), each look reveals the seeds
    the procedure asked for. ``effect`` plants A - base > 0; everything else sits exactly on
    its null (paired mean 0; fd mean 0.5, the threshold) unless ``fd_mean`` moves fd."""
    shared = rng.normal(size=plan.max)
    values = {arm: shared + rng.normal(size=plan.max) + (effect if arm == "A" else 0.0) for arm in ARMS}
    fd = {arm: fd_mean + rng.normal(size=plan.max) for arm in ARMS}
    seeds_of = {arm: plan.start for arm in ARMS}
    while True:
        per_run = per_run_table(values, seeds_of, fd)
        judged = evaluate(HYPOTHESES, per_run, ARMS, "base", looks=plan.looks)
        done = {arm: list(range(n)) for arm, n in seeds_of.items()}
        wanted = seeds_wanted(judged, HYPOTHESES, done, "base", plan)
        following = {arm: len(seeds) for arm, seeds in wanted.items()}
        if following == seeds_of:
            return judged.assign(seeds=judged["arm"].map(seeds_of))
        seeds_of = following


def false_positive_rate(studies: int) -> float:
    rng = np.random.default_rng(2026)
    plan = AdaptiveSeeds(start=3, max=8)
    wrong = sum((simulate(rng, plan)["verdict"] != "inconclusive").any() for _ in range(studies))
    return wrong / studies


def test_null_studies_keep_the_family_wise_false_positive_rate_at_or_under_five_percent():
    # 200 null studies of 7 hypothesis rows, 3 to 8 seeds: any decided row is a false positive
    rate = false_positive_rate(200)
    assert rate <= 0.05, rate


def test_naive_retesting_at_every_look_inflates_false_positives(monkeypatch):
    # the same machinery with every look testing at the full 5% (no spending): a row counts as
    # decided once any look decides it, as when one stops at the first significant look. What
    # the spending prevents, and proof that the simulation can fail a procedure.
    monkeypatch.setattr("harness.hypotheses.look_levels", lambda looks, alpha=0.05: [(n, alpha) for n in looks])
    rate = false_positive_rate(100)
    assert rate > 0.08, rate


def test_a_planted_effect_is_found_and_its_arm_stops_early():
    rng = np.random.default_rng(7)
    plan = AdaptiveSeeds(start=3, max=8)
    found, seeds, false_calls = 0, [], 0
    for _ in range(40):
        # fd far below its threshold: every arm's fd row is decided early, so A's seeds
        # depend on its planted effect alone
        judged = simulate(rng, plan, effect=4.0, fd_mean=-10.0)
        row = judged[(judged["name"] == "gap_above_zero") & (judged["arm"] == "A")].iloc[0]
        found += row["verdict"] == "supported"
        if row["verdict"] == "supported":
            assert 3 <= row["look_n"] <= row["n"]
            seeds.append(row["seeds"])
        null_rows = judged[(judged["name"] == "gap_above_zero") & (judged["arm"] != "A")]  # B, C: no effect
        false_calls += (null_rows["verdict"] != "inconclusive").any()
    assert found >= 36, found  # a 4-sigma paired effect (difference sd sqrt(2)) is found almost always
    assert np.mean(seeds) < 7, seeds  # ... mostly before the budget is spent
    assert false_calls <= 4, false_calls  # the other rows stay nulls: about 5% of studies at most


def test_a_single_look_is_the_fixed_design():
    rng = np.random.default_rng(3)
    per_run = per_run_table(
        {arm: rng.normal(size=5) for arm in ARMS}, {arm: 5 for arm in ARMS}, {arm: rng.normal(size=5) for arm in ARMS}
    )
    fixed = evaluate(HYPOTHESES, per_run, ARMS, "base")
    one_look = evaluate(HYPOTHESES, per_run, ARMS, "base", looks=[5])
    pd.testing.assert_frame_equal(fixed, one_look)


def test_seeds_wanted_grows_only_undecided_arms_and_their_baseline():
    plan = AdaptiveSeeds(start=3, max=8, batch=2)
    hypotheses = {
        "paired": Hypothesis(metric="fd", versus="baseline", expect="above", value=0.0),
        "own": Hypothesis(metric="fd", expect="below", value=1.0),
    }
    judged = pd.DataFrame(
        [
            {"name": "paired", "arm": "A", "n": 3, "verdict": "inconclusive"},
            {"name": "paired", "arm": "B", "n": 3, "verdict": "supported"},
            {"name": "own", "arm": "C", "n": 3, "verdict": "inconclusive"},
            {"name": "own", "arm": "D", "n": 0, "verdict": "inconclusive"},  # metric never measured
            {"name": "own", "arm": "E", "n": 8, "verdict": "inconclusive"},  # at the budget
        ]
    )
    done = {"base": [0, 1, 2], "A": [0, 1, 2], "B": [0, 1, 2], "C": [0, 1, 2], "D": [0, 1, 2], "E": list(range(8))}
    wanted = seeds_wanted(judged, hypotheses, done, "base", plan)
    assert {arm: len(s) for arm, s in wanted.items()} == {"base": 5, "A": 5, "B": 3, "C": 5, "D": 3, "E": 8}
    assert wanted["A"] == [0, 1, 2, 3, 4]
    # an arm that has not reached the start yet (a failed run) is asked for the start only
    assert len(seeds_wanted(judged.iloc[[0]].assign(n=2), hypotheses, done, "base", plan)["A"]) == 3
