"""Results reused across studies: a run key finished in one study is adopted by another under
the same results root (tables copied, MLflow run rebuilt and tagged), never trained twice."""

import pyarrow.parquet as pq
from mlflow import MlflowClient
from test_harness_run import TINY_BASE, harness, table

from harness.tables import TABLES

STUDY = """\
study: {name}
question: Is a run shared by two studies trained once?
{base}ablations:
  {axis}:
{levels}
seeds: [0]
"""


def write(folder, name, axis, levels):
    path = folder / f"{name}.yaml"
    body = "\n".join(f"    {label}: {{diffusion.T: {t}}}" for label, t in levels.items())
    path.write_text(STUDY.format(name=name, base=TINY_BASE, axis=axis, levels=body))
    return path


def test_a_run_finished_in_one_study_is_reused_by_another(tmp_path):
    first = write(tmp_path, "first", "steps", {"T20": 20})
    second = write(tmp_path, "second", "horizon", {"long": 20, "short": 5})  # `long` = first's T20
    done = harness(["run", str(first), "--no-report"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results" / "first").rglob("*") if p.is_file()}

    plan = harness(["plan", str(second), "--no-measure", "--no-check"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "1 to train, 0 done, 1 reused from other studies (first: 1)" in " ".join(plan.stdout.split())

    again = harness(["run", str(second), "--no-report"], tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    out = " ".join(again.stdout.split())
    assert "reused 1 finished run(s) from other studies instead of training them: long-s0 (first)" in out
    assert "1 to run" in out

    runs = table(tmp_path, "second", "runs").to_pandas().set_index("arm")
    assert set(runs["status"]) == {"finished"}
    assert "reused from study first" in runs.loc["long", "note"] and runs.loc["short", "note"] == ""
    key = runs.loc["long", "run_key"]
    first_runs = table(tmp_path, "first", "runs").to_pandas().set_index("arm")
    assert key == first_runs.loc["T20", "run_key"]
    for name in [t for t in TABLES if t != "runs"]:  # every table a run writes travels with it
        copied = pq.read_table(tmp_path / "results" / "second" / name / f"{key}.parquet").to_pandas()
        original = pq.read_table(tmp_path / "results" / "first" / name / f"{key}.parquet").to_pandas()
        assert copied.equals(original), name
    # the source study is untouched
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results" / "first").rglob("*") if p.is_file()}
    assert after == before

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("second")
    reused = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_key = '{key}'")
    assert len(reused) == 1
    run = reused[0]
    assert run.info.status == "FINISHED" and run.data.tags["reused_from"] == "first"
    assert run.data.tags["arm"] == "long" and run.data.tags["ablation.horizon"] == "long"
    train = pq.read_table(tmp_path / "results" / "second" / "train" / f"{key}.parquet").to_pandas()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(train)
    assert len(client.get_metric_history(run.info.run_id, "per_t/loss_mse")) > 0

    # a third run trains nothing and reuses nothing again
    third = harness(["run", str(second), "--no-report"], tmp_path)
    assert third.returncode == 0 and "0 to run" in third.stdout and "reused 1 finished" not in third.stdout
