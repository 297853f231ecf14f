"""Adaptive seeds: more seeds only where a hypothesis is undecided, with a valid sequential test.

A study with ``seeds: {start: 3, max: 8, batch: 1}`` runs ``start`` seeds of every arm, then
judges its hypotheses at each *look*: n = start, start + batch, ..., max seeds. Arms with an
undecided row (and the baseline they are paired with) get the next ``batch`` seeds; the study
stops when every row is decided or every undecided arm has ``max`` seeds.

Looking again and again at growing data inflates false positives if each look tests at 5%.
The procedure here keeps the family-wise error at alpha whatever the stopping rule:

* **Spending**: the Lan-DeMets O'Brien-Fleming spending function
  alpha(tau) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(tau)), tau = n / max (Lan & DeMets 1983, eq. 2.3).
  Look k may spend Delta_k = alpha(tau_k) - alpha(tau_{k-1}); early looks spend almost nothing
  (0.0014 at 3 of 8 seeds), the last look most (0.014).
* **Per row**: each look's Student-t p-value p_k (hypotheses.judge) rejects there iff
  p_k < Delta_k. The row's sequential p-value p = min_k p_k alpha / Delta_k is valid under its
  null by the union bound, P(p <= x) <= sum_k x Delta_k / alpha = x, for any rule deciding which
  looks happen (a row stopped early has fewer looks, which only raises p).
* **Across rows**: Holm on the sequential p-values, valid under any dependence.

Why not an exact group-sequential boundary: that needs the joint law of the t statistics of
nested samples of unequal, data-dependent sizes; the union bound needs only each look's own
t test, at the price of being conservative (it ignores the looks' positive correlation). The
null simulation in tests/test_sequential.py measures that price.

Pure: numpy / scipy / pandas; no IO.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd
from scipy import stats as _scipy_stats

from .spec import AdaptiveSeeds, Hypothesis


def obrien_fleming_spent(fraction: float, alpha: float = 0.05) -> float:
    """Error spent by information fraction ``fraction`` in (0, 1] (Lan-DeMets eq. 2.3)."""
    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return alpha  # exactly: the whole budget by the last look
    z = _scipy_stats.norm.ppf(1.0 - alpha / 2.0)
    return float(2.0 - 2.0 * _scipy_stats.norm.cdf(z / math.sqrt(min(1.0, fraction))))


def look_levels(looks: Sequence[int], alpha: float = 0.05) -> list[tuple[int, float]]:
    """(n, Delta_k) per look: what each look may spend; the Delta_k sum to alpha."""
    last = looks[-1]
    spent = [obrien_fleming_spent(n / last, alpha) for n in looks]
    return [(n, s - prev) for n, s, prev in zip(looks, spent, [0.0, *spent[:-1]])]


def seeds_wanted(
    judged: pd.DataFrame,
    hypotheses: Mapping[str, Hypothesis],
    finished_seeds: Mapping[str, Sequence[int]],
    baseline: str | None,
    plan: AdaptiveSeeds,
) -> dict[str, list[int]]:
    """The seeds each arm should have after this look: its next look's prefix of the plan's
    seeds where one of its rows is undecided (its baseline too, when paired), else what it has.

    ``judged`` is hypotheses.evaluate's frame; ``finished_seeds`` arm -> its finished seeds.
    A row with no value at all (n = 0 while its arm has runs: the metric is not measured) does
    not ask for seeds; more of them would not measure it either.
    """
    seeds = plan.seeds
    have = {arm: len([s for s in seeds if s in set(done)]) for arm, done in finished_seeds.items()}
    wanted = {arm: seeds[: max(n, plan.start)] for arm, n in have.items()}
    for row in judged.itertuples(index=False):
        if row.verdict != "inconclusive" or (row.n == 0 and have.get(row.arm, 0) > 0):
            continue
        # the row was judged on row.n seeds (those its arm and baseline share): both grow to
        # the next look after that
        following = plan.start if row.n < plan.start else next((n for n in plan.looks if n > row.n), None)
        if following is None:
            continue
        arms = [row.arm]
        if hypotheses[row.name].versus == "baseline" and baseline is not None:
            arms.append(baseline)
        for arm in arms:
            if len(wanted.get(arm, [])) < following:
                wanted[arm] = seeds[:following]
    return wanted
