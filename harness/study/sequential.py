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
  (0.0014 at 3 of 8 seeds), the last look most.
* **Exact boundaries** (``boundary_table``): a row's t statistics at its looks are those of
  nested prefixes of one sequence of seeds, so under the row's null (normal values) their joint
  law is that of iid N(0, 1) values, whatever their mean and sd. It is simulated once per set
  of looks (``PATHS`` null paths, a fixed RNG seed), and the two-sided boundaries c_k solve
  P(|t_j| <= c_j for j < k, |t_k| > c_k) = Delta_k one look after the other (the group-sequential
  recursion of Lan & DeMets 1983 with Student-t statistics; Jennison & Turnbull 2000, ch. 3 and
  7). The first look needs no simulation (it is the t distribution), and a look whose Delta_k
  leaves fewer than ``RESOLVED`` simulated crossings takes the marginal t quantile at Delta_k:
  a larger boundary, as the union bound would give, so still valid.
* **Per row**: it rejects at level alpha when ANY look it reached crosses c_k(alpha). Reached
  looks are a subset of all potential looks, so the probability of a crossing among them is at
  most that among all of them, alpha, whatever decided which looks were reached. Its
  sequential p-value is p = inf{alpha': some reached look has |t_k| > c_k(alpha')} (the
  "repeated" p-value of Jennison & Turnbull 2000, section 8.2): P(p <= x) <= x. The boundaries
  are tabulated on ``GRID`` (alpha' in log space, 1e-8 to 0.28) and interpolated; a p below the
  grid is reported as its smallest value and one above it as 1, both conservative.
* ``within`` rows (TOST): the same boundaries on each one-sided statistic.
* **Across rows**: Holm (1979) on the sequential p-values, valid under any dependence.

With one look the boundary is the t quantile and the procedure is the fixed design exactly.
The null and power simulations in tests/test_sequential.py measure what this buys over the
union bound p = min_k p_k alpha / Delta_k used before (docs/design.md, "Adaptive seeds").

Pure: numpy / scipy / pandas; the boundary tables are cached in memory and in the engine's
cache folder ($DDPM_ENGINE_CACHE, else ~/.cache/ddpm_engine).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import special as _scipy_special

from .spec import AdaptiveSeeds, Hypothesis

log = logging.getLogger(__name__)

PATHS = 200_000  # null paths per set of looks: Delta_k = 0.0014 is still 280 crossings
RNG_SEED = 20260
RESOLVED = 100  # fewer simulated crossings than this at a look: its marginal t boundary instead
# alpha' of the tabulated boundaries, 20 per decade. Not up to 1: near alpha' = 1 the
# O'Brien-Fleming increments Delta_k of later looks shrink again (at alpha' = 1 the first look
# spends everything), the boundaries would stop falling as alpha' grows, and a p-value needs
# them to fall. A p above 0.28 decides nothing and is reported as 1.
# 0.05 itself is a grid point, so a row decides at alpha = 0.05 on its tabulated boundary.
GRID = 0.05 * 10.0 ** (np.arange(-135, 16) / 20.0)  # 8.9e-9 .. 0.28
_CHUNK = 20_000
_VERSION = 1  # of the disk cache's content; bump when the computation changes


def obrien_fleming_spent(fraction, alpha=0.05):
    """Error spent by information fraction ``fraction`` in (0, 1] (Lan-DeMets eq. 2.3);
    either argument may be a numpy array."""
    fraction = np.asarray(fraction, dtype=float)
    alpha = np.asarray(alpha, dtype=float)
    z = _scipy_special.ndtri(1.0 - alpha / 2.0)
    with np.errstate(divide="ignore"):
        spent = 2.0 - 2.0 * _scipy_special.ndtr(z / np.sqrt(np.clip(fraction, 1e-300, 1.0)))
    spent = np.where(fraction <= 0, 0.0, np.where(fraction >= 1, alpha, spent))  # the whole budget by the last look
    return float(spent) if spent.ndim == 0 else spent


def look_levels(looks: Sequence[int], alpha: float = 0.05) -> list[tuple[int, float]]:
    """(n, Delta_k) per look: what each look may spend; the Delta_k sum to alpha."""
    last = looks[-1]
    spent = [obrien_fleming_spent(n / last, alpha) for n in looks]
    return [(n, s - prev) for n, s, prev in zip(looks, spent, [0.0, *spent[:-1]])]


def _null_t(looks: tuple[int, ...], paths: int, seed: int) -> np.ndarray:
    """|t| of each look's prefix, for ``paths`` sequences of iid N(0, 1) values: (paths, K)."""
    rng = np.random.default_rng(seed)
    n = np.asarray(looks)
    out = np.empty((paths, len(looks)), dtype=np.float32)
    for first in range(0, paths, _CHUNK):
        x = rng.standard_normal((min(_CHUNK, paths - first), looks[-1]))
        s1 = np.cumsum(x, axis=1)[:, n - 1]
        s2 = np.cumsum(x * x, axis=1)[:, n - 1]
        mean = s1 / n
        var = np.maximum((s2 - n * mean**2) / (n - 1), 1e-300)
        out[first : first + len(x)] = np.abs(mean * np.sqrt(n / var))
    return out


def _compute_table(looks: tuple[int, ...], paths: int, seed: int) -> np.ndarray:
    n = np.asarray(looks, dtype=float)
    spent = obrien_fleming_spent((n / n[-1])[None, :], GRID[:, None])  # (G, K), cumulative
    delta = np.diff(spent, axis=1, prepend=0.0)
    # marginal boundaries (the union bound's), from the lower tail: 1 - Delta/2 rounds to 1
    table = -_scipy_special.stdtrit(n[None, :] - 1, delta / 2.0)
    if len(looks) == 1:
        return table
    resolved = delta * paths >= RESOLVED
    resolved[:, 0] = False  # the first look's law is the t distribution itself
    abs_t = _null_t(looks, paths, seed)
    order = np.argsort(-abs_t, axis=0, kind="stable")
    ranked = np.take_along_axis(abs_t, order, axis=0)
    for g in np.flatnonzero(resolved.any(axis=1)):
        alive = np.ones(paths, dtype=bool)  # paths that have crossed no earlier boundary
        for k in range(len(looks)):
            if resolved[g, k]:
                target = int(delta[g, k] * paths)
                survivors = np.cumsum(alive[order[:, k]])
                j = int(np.searchsorted(survivors, target + 1))  # the first surviving path NOT to cross
                simulated = float(ranked[j, k]) if j < paths else 0.0
                # the conditional boundary is below the marginal one; the min keeps Monte Carlo
                # noise from ever making it less conservative than the union bound
                table[g, k] = min(table[g, k], simulated)
            if k + 1 < len(looks) and resolved[g, k + 1 :].any():
                alive &= abs_t[:, k] <= table[g, k]
    # the boundaries fall as alpha' grows; where Monte Carlo noise breaks that, the larger wins
    return np.maximum.accumulate(table[::-1], axis=0)[::-1]


def _cache_file(looks: tuple[int, ...], paths: int, seed: int) -> Path:
    root = Path(os.environ.get("DDPM_ENGINE_CACHE") or "~/.cache/ddpm_engine").expanduser()
    name = f"boundaries-v{_VERSION}-{paths}-{seed}-{len(GRID)}-{'_'.join(map(str, looks))}.npy"
    return root / "sequential" / name


@functools.lru_cache(maxsize=64)
def boundary_table(looks: tuple[int, ...], paths: int = PATHS, seed: int = RNG_SEED) -> np.ndarray:
    """c_k(alpha') for alpha' in ``GRID`` (rows) and each look (columns): the two-sided
    boundaries of the module docstring. Seconds for a few looks, more for dozens, so also kept
    on disk; an unreadable or unwritable cache only costs the recomputation."""
    looks = tuple(int(n) for n in looks)
    path = _cache_file(looks, paths, seed)
    try:
        table = np.load(path, allow_pickle=False)
        if table.shape == (len(GRID), len(looks)):
            return table
    except (OSError, ValueError):
        pass
    table = _compute_table(looks, paths, seed)
    try:
        from ddpm_engine.files import atomic_write

        atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), table, allow_pickle=False))
    except OSError as error:
        log.debug("boundary cache not written to %s: %s", path, error)
    return table


def crossing_level(looks: Sequence[int], statistics: Sequence[float]) -> tuple[float, int]:
    """(p, index of the look giving it): the smallest alpha' at which some look's statistic
    crosses its boundary c_k(alpha'), over the first ``len(statistics)`` looks (those reached).

    A statistic is compared one-sided (t > c_k): pass |t| for a two-sided test. NaN never
    crosses (a look with no spread in an estimated metric); +inf crosses at any level (p = 0).
    """
    table = boundary_table(tuple(looks))
    log_grid = np.log(GRID)
    best, where = 1.0, -1
    for k, t in enumerate(statistics):
        if not t > 0:  # NaN, or on the wrong side: crosses no boundary below alpha' = 1
            continue
        if math.isinf(t):
            return 0.0, k
        column = table[:, k]  # non-increasing in alpha'
        g = int(np.argmax(column < t)) if (column < t).any() else len(GRID)
        if g == len(GRID):
            continue
        if g == 0:
            level = float(GRID[0])  # below the grid: its smallest alpha', conservative
        else:
            high, low = column[g - 1], column[g]
            share = (high - t) / (high - low) if high > low else 1.0
            level = float(np.exp(log_grid[g - 1] + share * (log_grid[g] - log_grid[g - 1])))
        if level < best:
            best, where = level, k
    return best, where


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
