"""The results layer and the hypotheses on hand-made tables whose answers are known (no engine run).

Study "handmade": T = 10 (every t probed, t_mid = 5), seeds 0, 1, 2, arms
  base    loss at t=1 well above t=5, a large predicted-noise bias, darker samples;
  armA    loss at t=1 below t=5, no bias, samples match the data;
  armB    loss difference of mixed sign over seeds (inconclusive);
  broken  one failed run whose tables exist anyway (ignored).
Each finished run also has an earlier probe (step 5) with absurd values that must be ignored.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from handmade import HYPOTHESES_COLUMNS, write_run, write_study
from scipy import stats as scipy_stats

from ddpm_engine.metrics import PER_RUN, mean_over_t, nearest_t, per_t_summary
from harness.report import build_report
from harness.report.results import StudyResults

STUDY = "handmade"
SEEDS = [0, 1, 2]
ARMS = ["base", "armA", "armB", "broken"]
T = 10

DESIGN = {
    "base": dict(
        loss1=[0.50, 0.55, 0.60],
        loss5=[0.20, 0.22, 0.21],
        bias_t=3,
        bias=[-0.10, -0.12, -0.11],
        std1=[0.80, 0.82, 0.84],
        gap=[-0.10, -0.12, -0.11],
    ),
    "armA": dict(
        loss1=[0.10, 0.12, 0.11],
        loss5=[0.20, 0.21, 0.22],
        bias_t=2,
        bias=[0.004, -0.005, 0.006],
        std1=[1.01, 0.99, 1.00],
        gap=[0.001, -0.002, 0.0005],
    ),
    "armB": dict(
        loss1=[0.40, 0.15, 0.30],
        loss5=[0.20, 0.25, 0.25],
        bias_t=10,
        bias=[0.20, 0.25, 0.22],
        std1=[1.30, 1.35, 1.32],
        gap=[-0.05, 0.04, 0.0],
    ),
}
HYPOTHESES = {
    "small_t_is_hard": {
        "metric": "loss_small_minus_mid",
        "expect": "above",
        "value": 0.0,
        "says": "the loss at the smallest t is above mid t",
    },
    "darker_than_base": {
        "metric": "final_mean_gap",
        "versus": "baseline",
        "arm": "armA",
        "expect": "above",
        "value": 0.0,
    },
    "matches_data": {"metric": "final_mean_gap", "arm": "armA", "expect": "within", "value": 0.01},
}


def per_t_frame(arm: str, i: int) -> pd.DataFrame:
    d = DESIGN[arm]
    ts = np.arange(1, T + 1)
    final = pd.DataFrame(
        {
            "step": 10,
            "t": ts,
            "alphabar": np.linspace(0.99, 0.01, T),
            "wt": 1.0,
            "loss_mse": 0.3,
            "eps_pred_mean": 0.0,
            "eps_pred_std": 1.0,
            "err_mean": 0.001,
            "err_std": 0.5,
            "vlb_bits": 0.1,
        }
    )
    final.loc[final["t"] == 1, "loss_mse"] = d["loss1"][i]
    final.loc[final["t"] == 5, "loss_mse"] = d["loss5"][i]
    final.loc[final["t"] == 1, "eps_pred_std"] = d["std1"][i]
    final.loc[final["t"] == d["bias_t"], "err_mean"] = d["bias"][i]
    early = final.assign(step=5, loss_mse=5.0, eps_pred_std=3.0, err_mean=0.9)  # not the final probe
    return pd.concat([early, final], ignore_index=True)


def quality_frame(arm: str, i: int) -> pd.DataFrame:
    # recorded before the per-t metrics were declared: they must be derived from per_t
    return pd.DataFrame([{"final_mean_gap": DESIGN[arm]["gap"][i], "fd": 1.0}])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_study(root, STUDY, ARMS, SEEDS, "base", hypotheses=HYPOTHESES)
    for arm in DESIGN:
        for i, seed in enumerate(SEEDS):
            write_run(root, STUDY, arm, seed, per_t=per_t_frame(arm, i), quality=quality_frame(arm, i))
    write_run(root, STUDY, "broken", 0, status="failed", per_t=per_t_frame("base", 0), quality=quality_frame("base", 0))
    return root


@pytest.fixture(scope="module")
def page(results, tmp_path_factory):
    return build_report(STUDY, results, tmp_path_factory.mktemp("reports")).read_text()


def test_per_run_metrics_come_from_the_final_probe_of_finished_runs(results):
    data = StudyResults.load(results, STUDY)
    per_run = data.per_run()
    assert len(per_run) == 9 and "broken" not in set(per_run["arm"])
    assert list(per_run.columns) == ["run_key", "arm", "seed", *PER_RUN]
    base = per_run[per_run["arm"] == "base"].sort_values("seed")
    np.testing.assert_allclose(base["loss_t_small"], [0.50, 0.55, 0.60])
    np.testing.assert_allclose(base["loss_t_mid"], [0.20, 0.22, 0.21])
    np.testing.assert_allclose(base["loss_small_minus_mid"], [0.30, 0.33, 0.39])
    np.testing.assert_allclose(base["eps_bias_max"], [0.10, 0.12, 0.11])
    np.testing.assert_allclose(base["eps_std_gap_small"], [-0.20, -0.18, -0.16])
    # |std - 1| is 0.2 at t=1 and 0 at every t from 2 to 10 (all probed): the mean is 0.2 / 10
    assert base["eps_std_gap_mean"].iloc[0] == pytest.approx(0.2 / 10)
    assert math.isnan(per_run["bpd"].iloc[0])  # declared, not measured here
    assert data.metric("final_mean_gap")["armA"] == pytest.approx({0: 0.001, 1: -0.002, 2: 0.0005})


def test_per_t_summary_pieces():
    assert nearest_t([2, 9, 11, 20], 10) == 9  # ties go to the smaller t
    curve = pd.Series([0.0, 1.0], index=[1, 3])
    assert mean_over_t(curve) == pytest.approx(0.5)  # t = 1, 2, 3 -> 0, 0.5, 1
    assert all(math.isnan(v) for v in per_t_summary(pd.DataFrame()).values())


def test_hypotheses_are_judged_and_written(results, page):
    table = pq.read_table(results / STUDY / "hypotheses.parquet").to_pandas()
    assert list(table.columns[:13]) == HYPOTHESES_COLUMNS
    rows = {(r["name"], r["arm"]): r for r in table.to_dict("records")}
    # every arm with data: base supported, armA refuted, armB inconclusive, broken no finished run
    assert rows["small_t_is_hard", "base"]["verdict"] == "supported"
    assert rows["small_t_is_hard", "armA"]["verdict"] == "refuted"
    assert rows["small_t_is_hard", "armB"]["verdict"] == "inconclusive"
    assert (
        rows["small_t_is_hard", "broken"]["n"] == 0 and rows["small_t_is_hard", "broken"]["verdict"] == "inconclusive"
    )
    d = np.array([0.30, 0.33, 0.39])
    half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert rows["small_t_is_hard", "base"]["ci_low"] == pytest.approx(d.mean() - half)
    # paired by seed against the baseline: armA - base final_mean_gap = 0.101, 0.118, 0.1105
    paired = rows["darker_than_base", "armA"]
    assert paired["estimate"] == pytest.approx(np.mean([0.101, 0.118, 0.1105])) and paired["n"] == 3
    assert ("darker_than_base", "base") not in rows
    assert rows["matches_data", "armA"]["n"] == 3
    # Holm across every row with a p-value
    finite = table["p_value"].notna()
    assert (table.loc[finite, "p_adjusted"] >= table.loc[finite, "p_value"] - 1e-15).all()
    section = re.search(r'<section id="hypotheses">(.*?)</section>', page, re.S).group(1)
    assert "the loss at the smallest t is above mid t" in section and "supported" in section and "refuted" in section
    assert page.index('id="hypotheses"') < page.index('id="design"')  # first on the page


def test_a_truncated_runs_file_is_set_aside_and_its_key_runs_again(tmp_path):
    """A `runs` file cut short (a full disk, a hand edit) used to crash status, run and plan
    with an ArrowInvalid traceback naming no file. Now it is renamed to .corrupt (kept), the
    ledger names it, and its key counts as pending; the other keys are unaffected."""
    from harness.runs.ledger import Ledger
    from harness.runs.lifecycle import RunState

    write_study(tmp_path, "cut", ["a", "b"], [0], "a")
    good = write_run(tmp_path, "cut", "a", 0)
    bad = write_run(tmp_path, "cut", "b", 0)
    path = tmp_path / "cut" / "runs" / f"{bad}.parquet"
    path.write_bytes(path.read_bytes()[:40])
    ledger = Ledger.load(tmp_path, "cut")
    assert ledger.quarantined == [path] and not path.exists() and path.with_name(path.name + ".corrupt").exists()
    assert ledger.state(good) is RunState.FINISHED and ledger.state(bad) is RunState.PENDING
    assert Ledger.load(tmp_path, "cut").state(good) is RunState.FINISHED  # nothing left to trip on


def test_tables_written_under_old_column_names_read_under_the_new_ones(tmp_path):
    """loss_floor, floor_denoiser, floor_t_small, frac_t_above_floor and oracle_* were renamed;
    a study holding runs of the old code next to new ones reads both under the new names, and an
    old row's shortfall_t_small (clipped at 0 then) is derived again, signed, from its probe."""
    write_study(tmp_path, STUDY, ["old", "new"], [0], "old")
    probe = per_t_frame("base", 0)
    probe = probe[probe["step"] == 10].assign(loss_mse=0.3)  # below the best reference at t = 1 below
    old_key = write_run(
        tmp_path,
        STUDY,
        "old",
        0,
        per_t=probe.assign(loss_floor=0.4, floor_denoiser="pixelwise"),
        quality=pd.DataFrame([{"floor_t_small": 0.4, "shortfall_t_small": 0.0, "frac_t_above_floor": 0.0}]),
        drift=pd.DataFrame({"t": [1, 0], "mean": [0.1, 0.2], "oracle_mean": [0.3, 0.4]}),
    )
    new_key = write_run(
        tmp_path,
        STUDY,
        "new",
        0,
        per_t=probe.assign(loss_best_ref=0.2, best_ref_denoiser="gaussian"),
        quality=pd.DataFrame([{"best_ref_t_small": 0.2, "shortfall_t_small": 0.1, "frac_t_above_best_ref": 1.0}]),
        drift=pd.DataFrame({"t": [1, 0], "mean": [0.1, 0.2], "gauss_chain_mean": [0.5, 0.6]}),
    )
    data = StudyResults.load(tmp_path, STUDY)
    per_t = data.table("per_t").set_index("run_key")
    assert "loss_floor" not in per_t and "floor_denoiser" not in per_t
    assert set(per_t.loc[old_key, "loss_best_ref"]) == {0.4} and set(per_t.loc[new_key, "loss_best_ref"]) == {0.2}
    assert set(per_t.loc[old_key, "best_ref_denoiser"]) == {"pixelwise"}
    drift = data.table("drift").set_index(["run_key", "t"])
    assert "oracle_mean" not in drift and drift.loc[(old_key, 0), "gauss_chain_mean"] == 0.4
    assert drift.loc[(new_key, 0), "gauss_chain_mean"] == 0.6
    per_run = data.per_run().set_index("run_key")
    assert per_run.loc[old_key, "best_ref_t_small"] == 0.4 and per_run.loc[new_key, "best_ref_t_small"] == 0.2
    assert per_run.loc[old_key, "frac_t_above_best_ref"] == 0.0
    assert per_run.loc[old_key, "shortfall_t_small"] == pytest.approx(0.3 - 0.4)  # re-derived, signed
    assert per_run.loc[new_key, "shortfall_t_small"] == 0.1  # a new run's own value stands
