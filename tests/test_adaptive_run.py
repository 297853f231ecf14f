"""Adaptive seeds end to end: `harness run` adds seeds only to the arms whose hypotheses stay
undecided, and the report and hypotheses.parquet judge them sequentially."""

import pyarrow.parquet as pq
from test_harness_run import TINY_BASE, harness, table

STUDY = (
    """\
study: adaptive
question: Are more seeds spent only where a hypothesis is undecided?
"""
    + TINY_BASE
    + """\
ablations:
  timesteps:
    T20: {diffusion.T: 20}
    T10: {diffusion.T: 10}
    T5: {diffusion.T: 5}
seeds: {start: 2, max: 3}
hypotheses:
  fewer_steps_leave_signal:  # the same in every seed: decided at the first look
    metric: prior_bits
    versus: baseline
    expect: above
  t10_is_bigger:  # exactly 0 in every seed, on its threshold: never decided
    metric: params
    arm: T10
    versus: baseline
    expect: above
"""
)


def test_adaptive_seeds_grow_only_the_undecided_arm_and_its_baseline(tmp_path):
    study = tmp_path / "adaptive.yaml"
    study.write_text(STUDY)
    plan = harness(["plan", str(study), "--no-measure", "--no-check"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "6 to 9 runs (3 arms x 2 to 3 adaptive seeds" in " ".join(plan.stdout.split())
    done = harness(["run", str(study)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "adaptive seeds: 1 hypothesis row(s) undecided; T20 -> 3 seeds, T10 -> 3 seeds" in out
    assert "adaptive seeds: stopped (1 row(s) undecided at the seed budget); seeds per arm: T20 3, T10 3, T5 2" in out
    runs = table(tmp_path, "adaptive", "runs").to_pandas()
    assert runs.groupby("arm")["seed"].apply(sorted).to_dict() == {"T20": [0, 1, 2], "T10": [0, 1, 2], "T5": [0, 1]}
    assert set(runs["status"]) == {"finished"}
    judged = pq.read_table(tmp_path / "results" / "adaptive" / "hypotheses.parquet").to_pandas()
    leaks = judged[judged["name"] == "fewer_steps_leave_signal"].set_index("arm")
    assert leaks.loc["T5", "verdict"] == "supported" and leaks.loc["T5", "n"] == 2
    assert leaks.loc["T10", "verdict"] == "supported" and leaks.loc["T10", "n"] == 3
    params = judged[judged["name"] == "t10_is_bigger"].iloc[0]
    assert params["verdict"] == "inconclusive" and params["n"] == 3 and params["look_n"] == 0
    html = (tmp_path / "reports" / "adaptive" / "index.html").read_text()
    assert "Adaptive seeds: every arm ran 2" in html and "seeds run: T20 3, T10 3, T5 2" in html
    # a second run looks again, finds nothing to add and trains nothing
    again = harness(["run", str(study), "--no-report"], tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr
    assert len(table(tmp_path, "adaptive", "runs").to_pandas()) == 8
