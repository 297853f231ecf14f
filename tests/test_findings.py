"""Findings F1-F3 on hand-made tables whose answers are known (no engine run).

Study "handmade": T = 10 (every t probed, t_mid = 5), seeds 0, 1, 2, arms
  base  F1 reproduced, F2 partly (bias and std at t=1 depart; mean over t of |std - 1| does
        not), F3 reproduced (darker and more saturated);
  armA  F1 not reproduced (loss at t=1 below mid t), F2 not reproduced, F3 not reproduced
        (matches the data);
  armB  F1 inconclusive, F2 reproduced, F3 partly (mean gap inconclusive, less saturated);
  broken  one failed run whose tables exist anyway (ignored): no data.
Each finished run also has an earlier probe (step 5) with absurd values that must be ignored.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from handmade import write_run, write_study
from harness import findings as F
from harness.report import build_report, load_study

STUDY = "handmade"
SEEDS = [0, 1, 2]
ARMS = ["base", "armA", "armB", "broken"]
T = 10

# per seed: loss at t=1 and t=5; (t, err_mean) of the largest |err_mean|; eps_pred_std at t=1
# and elsewhere; quality final_mean_gap and sat_frac (ref_sat_frac is 0.30 everywhere)
DESIGN = {
    "base": dict(loss1=[0.50, 0.55, 0.60], loss5=[0.20, 0.22, 0.21], bias_t=3, bias=[-0.10, -0.12, -0.11],
                 std1=[0.80, 0.82, 0.84], std=[1.0, 1.0, 1.0], gap=[-0.10, -0.12, -0.11], sat=[0.40, 0.42, 0.44]),
    "armA": dict(loss1=[0.10, 0.12, 0.11], loss5=[0.20, 0.21, 0.22], bias_t=2, bias=[0.004, -0.005, 0.006],
                 std1=[1.01, 0.99, 1.00], std=[1.0, 1.0, 1.0], gap=[0.001, -0.002, 0.0005], sat=[0.301, 0.300, 0.299]),
    "armB": dict(loss1=[0.40, 0.15, 0.30], loss5=[0.20, 0.25, 0.25], bias_t=10, bias=[0.20, 0.25, 0.22],
                 std1=[1.30, 1.35, 1.32], std=[1.30, 1.35, 1.32], gap=[-0.05, 0.04, 0.0], sat=[0.25, 0.24, 0.26]),
}
REF_SAT = 0.30


def per_t_frame(arm: str, i: int) -> pd.DataFrame:
    d = DESIGN[arm]
    ts = np.arange(1, T + 1)
    final = pd.DataFrame({
        "step": 10, "t": ts, "alphabar": np.linspace(0.99, 0.01, T), "wt": 1.0,
        "loss_mse": 0.3, "eps_pred_mean": 0.0, "eps_pred_std": d["std"][i], "err_mean": 0.001, "err_std": 0.5,
        "vlb_bits": 0.1,
    })
    final.loc[final["t"] == 1, "loss_mse"] = d["loss1"][i]
    final.loc[final["t"] == 5, "loss_mse"] = d["loss5"][i]
    final.loc[final["t"] == 1, "eps_pred_std"] = d["std1"][i]
    final.loc[final["t"] == d["bias_t"], "err_mean"] = d["bias"][i]
    early = final.assign(step=5, loss_mse=5.0, eps_pred_std=3.0, err_mean=0.9)  # not the final probe
    return pd.concat([early, final], ignore_index=True)


def quality_frame(arm: str, i: int) -> pd.DataFrame:
    d = DESIGN[arm]
    return pd.DataFrame([{"final_mean_gap": d["gap"][i], "sat_frac": d["sat"][i], "ref_sat_frac": REF_SAT, "fd": 1.0}])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_study(root, STUDY, ARMS, SEEDS, "base", question="Do the seed's observations reproduce?")
    for arm in DESIGN:
        for i, seed in enumerate(SEEDS):
            write_run(root, STUDY, arm, seed, per_t=per_t_frame(arm, i), quality=quality_frame(arm, i))
    # a failed run's tables must not count, even when they exist
    write_run(root, STUDY, "broken", 0, status="failed", per_t=per_t_frame("base", 0), quality=quality_frame("base", 0))
    return root


@pytest.fixture(scope="module")
def found(results):
    data = load_study(STUDY, results)
    f1, f2, f3 = F.compute_findings(data.runs, data.tables["per_t"], data.tables["quality"], arms=data.arms, baseline="base")
    return {"F1": f1, "F2": f2, "F3": f3}


def by_hand(values) -> tuple[float, float]:
    """Mean and 95% Student-t half-width (df = n - 1), computed here from scratch."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    return float(x.mean()), float(scipy_stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))


def assert_estimate(est: F.Estimate, values) -> None:
    mean, half = by_hand(values)
    assert est.n == len(values)
    assert est.mean == pytest.approx(mean, abs=1e-12)
    assert est.half == pytest.approx(half, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------- F1


def test_f1_numbers_and_verdicts(found):
    f1 = found["F1"]
    base = f1.arm("base")
    assert base.t_used == {"t_small": "1", "t_mid": "5"}
    # d1 = 0.30, 0.33, 0.39: mean 0.34, sample variance 0.0021
    assert base.checks["d1"].estimate.mean == pytest.approx(0.34)
    assert base.checks["d1"].estimate.half == pytest.approx(4.302652729911275 * math.sqrt(0.0021) / math.sqrt(3))
    assert_estimate(base.shown["loss_small"], [0.50, 0.55, 0.60])
    assert_estimate(base.shown["loss_mid"], [0.20, 0.22, 0.21])
    assert base.status == F.REPRODUCED and base.checks["d1"].word == "above 0"

    arm_a = f1.arm("armA")
    assert_estimate(arm_a.checks["d1"].estimate, [-0.10, -0.09, -0.11])
    assert arm_a.status == F.NOT_REPRODUCED and arm_a.checks["d1"].word == "below 0"

    arm_b = f1.arm("armB")
    assert_estimate(arm_b.checks["d1"].estimate, [0.20, -0.10, 0.05])
    assert arm_b.status == F.INCONCLUSIVE

    assert f1.arm("broken").status == F.NO_DATA and f1.arm("broken").n_runs == 0
    assert (f1.n_reproduced, f1.n_with_data) == (1, 3)
    assert f1.sentence.startswith("F1 (") and "baseline arm base: reproduced" in f1.sentence
    assert "reproduced in 1 of 3 arm(s) with data." in f1.sentence
    assert f1.sentence.count(". ") == 0  # one sentence


def test_f1_uses_the_final_probe_and_finished_runs_only(found):
    per_run = found["F1"].per_run
    assert len(per_run) == 9 and "broken" not in set(per_run["arm"])
    assert (per_run["loss_small"] < 1).all()  # the step-5 probe (loss 5.0) is ignored


def test_nearest_t_ties_go_to_the_smaller_t():
    assert F.nearest_t([2, 9, 11, 20], 10) == 9
    assert F.nearest_t([2, 12, 20], 10) == 12


# ------------------------------------------------------------------------------------- F2


def test_f2_numbers_and_verdicts(found):
    f2 = found["F2"]
    base = f2.arm("base")
    assert_estimate(base.checks["bias"].estimate, [0.10, 0.12, 0.11])
    assert_estimate(base.shown["bias_signed"], [-0.10, -0.12, -0.11])
    assert base.t_used["bias_t"] == "3" and base.t_used["t_small"] == "1"
    assert base.checks["bias"].status == F.REPRODUCED  # 0.11 +- 0.025, above 0.03
    assert_estimate(base.checks["std_small"].estimate, [-0.20, -0.18, -0.16])
    assert (base.checks["std_small"].status, base.checks["std_small"].word) == (F.REPRODUCED, "std below 1")
    # |std - 1| is nonzero at t=1 only: its mean over t = 1..10 is a tenth of it
    assert_estimate(base.checks["std_over_t"].estimate, [0.020, 0.018, 0.016])
    assert base.checks["std_over_t"].status == F.NOT_REPRODUCED  # CI within 0.05
    assert base.status == F.PARTLY

    arm_a = f2.arm("armA")
    assert_estimate(arm_a.checks["bias"].estimate, [0.004, 0.005, 0.006])
    assert arm_a.t_used["bias_t"] == "2"
    assert_estimate(arm_a.checks["std_small"].estimate, [0.01, -0.01, 0.0])
    assert arm_a.checks["std_small"].word == "within ±0.05"
    assert arm_a.status == F.NOT_REPRODUCED
    assert all(c.status == F.NOT_REPRODUCED for c in arm_a.checks.values())

    arm_b = f2.arm("armB")
    assert_estimate(arm_b.checks["bias"].estimate, [0.20, 0.25, 0.22])
    assert_estimate(arm_b.checks["std_small"].estimate, [0.30, 0.35, 0.32])
    assert_estimate(arm_b.checks["std_over_t"].estimate, [0.30, 0.35, 0.32])
    assert arm_b.checks["std_small"].word == "std above 1"
    assert arm_b.status == F.REPRODUCED
    assert (f2.n_reproduced, f2.n_partly, f2.n_with_data) == (1, 1, 3)
    assert "baseline arm base: partly reproduced" in f2.sentence


def test_mean_over_t_interpolates_between_probed_t():
    # |std - 1| = 0.2 at t=1, 0 at t=3 and at t=5: t = 1..5 gives 0.2, 0.1, 0, 0, 0
    curve = pd.Series([0.2, 0.0, 0.0], index=[1, 3, 5])
    assert F.mean_over_t(curve) == pytest.approx(0.3 / 5)


# ------------------------------------------------------------------------------------- F3


def test_f3_numbers_and_verdicts(found):
    f3 = found["F3"]
    base = f3.arm("base")
    assert_estimate(base.checks["final_mean_gap"].estimate, [-0.10, -0.12, -0.11])
    assert_estimate(base.checks["sat_gap"].estimate, [0.10, 0.12, 0.14])
    assert_estimate(base.shown["sat_frac"], [0.40, 0.42, 0.44])
    assert base.checks["final_mean_gap"].word == "darker" and base.checks["sat_gap"].word == "more saturated"
    assert base.status == F.REPRODUCED

    arm_a = f3.arm("armA")  # matches the data: both CIs inside +-0.01
    assert_estimate(arm_a.checks["final_mean_gap"].estimate, [0.001, -0.002, 0.0005])
    assert_estimate(arm_a.checks["sat_gap"].estimate, [0.001, 0.0, -0.001])
    assert [c.status for c in arm_a.checks.values()] == [F.NOT_REPRODUCED, F.NOT_REPRODUCED]
    assert arm_a.status == F.NOT_REPRODUCED

    arm_b = f3.arm("armB")
    assert_estimate(arm_b.checks["final_mean_gap"].estimate, [-0.05, 0.04, 0.0])
    assert arm_b.checks["final_mean_gap"].status == F.INCONCLUSIVE
    assert (arm_b.checks["sat_gap"].status, arm_b.checks["sat_gap"].word) == (F.REPRODUCED, "less saturated")
    assert arm_b.status == F.PARTLY
    assert "baseline arm base: reproduced" in f3.sentence and "darker" in f3.sentence


def test_judgements_at_the_edges():
    one = F.Estimate(0.5, math.nan, 1)
    assert F.judge_above(one) == (F.INCONCLUSIVE, "n=1, no interval")
    assert F.judge_above(F.Estimate(math.nan, math.nan, 0))[0] == F.NO_DATA
    assert F.judge_departure(F.Estimate(-0.2, 0.1, 3), 0.05, "darker", "brighter") == (F.REPRODUCED, "darker")
    assert F.judge_departure(F.Estimate(-0.1, 0.1, 3), 0.05, "darker", "brighter")[0] == F.INCONCLUSIVE
    assert F.combine([F.NO_DATA, F.NO_DATA]) == F.NO_DATA
    assert F.combine([F.REPRODUCED, F.NO_DATA]) == F.PARTLY
    assert F.combine([F.NOT_REPRODUCED, F.INCONCLUSIVE]) == F.INCONCLUSIVE


def test_no_finished_runs_is_no_data():
    runs = pd.DataFrame([{"run_key": "k", "arm": "a", "seed": 0, "status": "running"}])
    per_t = pd.DataFrame({"run_key": ["k"], "step": [1], "t": [1], "loss_mse": [1.0]})
    for finding in F.compute_findings(runs, per_t, pd.DataFrame()):
        assert [a.status for a in finding.arms] == [F.NO_DATA]
        assert "no data" in finding.sentence
    for finding in F.compute_findings(pd.DataFrame(), pd.DataFrame(), pd.DataFrame()):
        assert finding.arms == [] and "no data" in finding.sentence


# ------------------------------------------------------------------------------------- page


def section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert match, anchor
    return match.group(1)


def test_page_has_the_findings_section_with_verdicts(results, tmp_path):
    html = build_report(STUDY, results, tmp_path / "reports").read_text()
    assert html.index('id="design"') < html.index('id="findings"') < html.index('id="metrics"')
    findings = section(html, "findings")
    assert "<h2>Findings</h2>" in findings
    for key in ("F1", "F2", "F3"):
        assert f">{key}: " in findings
    assert findings.count("Definition:") == 3
    assert "Student-t CI" in findings and "df = n − 1" in findings
    for word in ("reproduced", "not reproduced", "partly reproduced", "inconclusive", "no data", "darker", "more saturated"):
        assert word in findings, word
    table_rows = re.findall(r"<tr[^>]*>(.*?)</tr>", findings, re.S)
    base_f1 = next(r for r in table_rows if ">base <" in r)
    assert "0.34" in base_f1 and 'class="fnd-reproduced"' in base_f1
    assert "baseline arm base: reproduced" in findings


def test_page_with_no_finished_run_says_no_data(tmp_path):
    root = tmp_path / "results"
    write_study(root, "empty", ["base", "other"], [0], "base")
    write_run(root, "empty", "base", 0, status="failed", per_t=per_t_frame("base", 0))
    findings = section(build_report("empty", root, tmp_path / "reports").read_text(), "findings")
    assert findings.count("No data:") == 3 and "could not be computed" not in findings
