"""Adaptive seeds and reuse across studies, end to end through the real CLI, MLflow store and
Parquet: `harness run` adds seeds only to the arms whose hypotheses stay undecided, judges them
sequentially, and adopts a run key another study under the same results root has finished
instead of training it again."""

import pyarrow.parquet as pq
from mlflow import MlflowClient
from test_harness_run import TINY_BASE, harness, table

from harness.store.tables import TABLES

FIRST = "study: first\nquestion: Which run does the next study reuse?\n" + TINY_BASE + "seeds: [0]\n"

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


def test_adaptive_seeds_grow_only_the_undecided_arm_and_a_run_of_another_study_is_reused(tmp_path):
    (tmp_path / "first.yaml").write_text(FIRST)  # T = 20, seed 0: the run key of T20-s0 below
    first = harness(["run", "first.yaml", "--no-report"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results" / "first").rglob("*") if p.is_file()}

    study = tmp_path / "adaptive.yaml"
    study.write_text(STUDY)
    plan = harness(["plan", str(study), "--no-measure", "--no-check"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    said = " ".join(plan.stdout.split())
    assert "6 to 9 runs (3 arms x 2 to 3 adaptive seeds" in said
    assert "8 to train, 0 done, 1 reused from other studies (first: 1)" in said

    done = harness(["run", str(study)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "reused 1 finished run(s) from other studies instead of training them: T20-s0 (first)" in out
    assert "adaptive seeds: 1 hypothesis row(s) undecided; T20 -> 3 seeds, T10 -> 3 seeds" in out
    assert "adaptive seeds: stopped (1 row(s) undecided at the seed budget); seeds per arm: T20 3, T10 3, T5 2" in out
    runs = table(tmp_path, "adaptive", "runs").to_pandas()
    assert runs.groupby("arm")["seed"].apply(sorted).to_dict() == {"T20": [0, 1, 2], "T10": [0, 1, 2], "T5": [0, 1]}
    assert set(runs["status"]) == {"finished"}

    # the sequential verdicts
    judged = pq.read_table(tmp_path / "results" / "adaptive" / "hypotheses.parquet").to_pandas()
    leaks = judged[judged["name"] == "fewer_steps_leave_signal"].set_index("arm")
    assert leaks.loc["T5", "verdict"] == "supported" and leaks.loc["T5", "n"] == 2
    assert leaks.loc["T10", "verdict"] == "supported" and leaks.loc["T10", "n"] == 3
    params = judged[judged["name"] == "t10_is_bigger"].iloc[0]
    assert params["verdict"] == "inconclusive" and params["n"] == 3 and params["look_n"] == 0
    html = (tmp_path / "reports" / "adaptive" / "index.html").read_text()
    assert "Adaptive seeds: every arm ran 2" in html and "seeds run: T20 3, T10 3, T5 2" in html

    # the reused run: the same tables, this study's arm, an MLflow run tagged with its source
    reused = runs[(runs["arm"] == "T20") & (runs["seed"] == 0)].iloc[0]
    key = reused["run_key"]
    assert key == table(tmp_path, "first", "runs").to_pandas()["run_key"].iloc[0]
    assert "reused from study first" in reused["note"] and runs.loc[runs["run_key"] != key, "note"].eq("").all()
    for name in [t for t in TABLES if t != "runs"]:  # every table a run writes travels with it
        copied = pq.read_table(tmp_path / "results" / "adaptive" / name / f"{key}.parquet").to_pandas()
        original = pq.read_table(tmp_path / "results" / "first" / name / f"{key}.parquet").to_pandas()
        assert copied.equals(original), name
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "results" / "first").rglob("*") if p.is_file()}
    assert after == before  # the source study is untouched
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("adaptive")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_key = '{key}'")
    assert run.info.status == "FINISHED" and run.data.tags["reused_from"] == "first"
    assert run.data.tags["arm"] == "T20" and run.data.tags["ablation.timesteps"] == "T20"
    train = pq.read_table(tmp_path / "results" / "adaptive" / "train" / f"{key}.parquet").to_pandas()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(train)
    assert len(client.get_metric_history(run.info.run_id, "per_t/loss_mse")) > 0

    # a second run looks again, finds nothing to add, trains and reuses nothing
    again = harness(["run", str(study), "--no-report"], tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr
    assert "reused 1 finished" not in again.stdout
    assert len(table(tmp_path, "adaptive", "runs").to_pandas()) == 8
