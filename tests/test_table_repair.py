"""Every table is repairable, and MLflow's history matches the tables: a finished key's damaged
table is restored from its MLflow run or measured again from its checkpoint, by `harness run`,
`harness report` and the reuse of a key across studies; a run whose metric history lost points
is completed, and one adopted twice holds each point once. The real CLI, a real MLflow SQLite
store read back with MlflowClient, real Parquet.

One two-seed study is trained once (module fixture); each case copies its folder and breaks
the copy."""

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from test_recovery import copy_study_folder, harness_here, harness_process

STUDY = """\
study: {name}
question: Is any table lost?
base:
  data: {{max_images: 300}}
  model: {{preset: tiny, base_channels: 16, time_embed_dim: 32}}
  diffusion: {{T: 10}}
  train: {{steps: 10, batch_size: 32, log_every: 5, checkpoint_every: 10, warmup_steps: 2}}
  sample: {{num_samples: 16}}
  eval: {{probe_every: 10, probe_images: 32, drift_hist_steps: 5, quality: false}}
seeds: {seeds}
hypotheses:
  prior_leaks:
    metric: prior_bits
    expect: above
    value: 0.0
"""


def write_study(folder: Path, name: str, seeds: str = "[0, 1]") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, seeds=seeds))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-seed study: its folder and seed -> run key."""
    cwd = tmp_path_factory.mktemp("pair")
    out, err = harness_process(["run", str(write_study(cwd, "pair")), "--no-report"], cwd).communicate(timeout=900)
    assert "finished" in out, out + err
    runs = pd.read_parquet(cwd / "results" / "pair" / "runs")
    assert set(runs["status"]) == {"finished"}, runs
    return cwd, dict(zip(runs["seed"], runs["run_key"]))


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained study's folder whose store points at the copy's own artifacts."""
    return copy_study_folder(trained[0], tmp_path / "study")


def truncate(path: Path) -> None:
    """A table cut short outside the atomic writes (a full disk, a copy killed midway)."""
    path.write_bytes(path.read_bytes()[:100])


def mlflow_run(cwd: Path, key: str, study: str = "pair"):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_key = '{key}'")
    return client, run


def drop_artifact(cwd: Path, key: str, folder: str, study: str = "pair") -> None:
    _, run = mlflow_run(cwd, key, study)
    (path,) = cwd.glob(f"mlartifacts/*/{run.info.run_id}/artifacts/{folder}")
    shutil.rmtree(path)


def verdict_n(cwd: Path, study: str = "pair") -> int:
    judged = pq.read_table(cwd / "results" / study / "hypotheses.parquet").to_pandas()
    (n,) = judged["n"].tolist()
    return int(n)


def quality(cwd: Path, key: str, study: str = "pair") -> pd.Series:
    return pd.read_parquet(cwd / "results" / study / "quality" / f"{key}.parquet").iloc[0]


def said(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- item 1: this study's tables


def test_a_truncated_table_is_restored_from_mlflow_and_the_verdict_counts_both_seeds(trained, copy, monkeypatch):
    _, keys = trained
    before = quality(copy, keys[0])
    truncate(copy / "results" / "pair" / "quality" / f"{keys[0]}.parquet")
    result, out = harness_here(["run", "pair.yaml"], copy, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "0 to run" in out and "restored quality of base-s0 from its MLflow run" in out, out
    pd.testing.assert_series_equal(quality(copy, keys[0]), before)
    assert verdict_n(copy) == 2  # not 1: the repaired seed counts again
    assert "missing or unreadable" not in (copy / "reports" / "pair" / "index.html").read_text()


def test_a_damaged_table_mlflow_lacks_is_measured_again_from_the_checkpoint(trained, copy):
    _, keys = trained
    truncate(copy / "results" / "pair" / "quality" / f"{keys[1]}.parquet")
    drop_artifact(copy, keys[1], "quality")
    out, err = harness_process(["run", "pair.yaml"], copy).communicate(timeout=900)
    text = said(out)
    assert "quality of base-s1 is damaged and MLflow has no copy: measured again from its checkpoint" in text, out + err
    assert "1 to run" in text and "Traceback" not in out + err
    measured = quality(copy, keys[1])
    assert measured["resumed_from_step"] == measured["train_steps"] == 10  # measured, nothing trained
    assert set(pd.read_parquet(copy / "results" / "pair" / "runs")["status"]) == {"finished"}
    assert verdict_n(copy) == 2
    client, run = mlflow_run(copy, keys[1])  # the same MLflow run, finished again, its table logged
    assert run.info.status == "FINISHED"
    assert "quality" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_missing_table_with_no_checkpoint_is_trained_again(trained, copy):
    _, keys = trained
    (copy / "results" / "pair" / "drift" / f"{keys[0]}.parquet").unlink()
    drop_artifact(copy, keys[0], "drift")
    shutil.rmtree(copy / "results" / "pair" / "checkpoints")
    out, err = harness_process(["run", "pair.yaml", "--no-report"], copy).communicate(timeout=900)
    assert "drift of base-s0 is missing and MLflow has no copy: trained again (no checkpoint)" in said(out), out + err
    assert quality(copy, keys[0])["resumed_from_step"] == 0
    assert (copy / "results" / "pair" / "drift" / f"{keys[0]}.parquet").exists()


def test_report_restores_what_mlflow_has_and_names_what_it_has_not(trained, copy, monkeypatch):
    _, keys = trained
    truncate(copy / "results" / "pair" / "quality" / f"{keys[0]}.parquet")
    truncate(copy / "results" / "pair" / "quality" / f"{keys[1]}.parquet")
    drop_artifact(copy, keys[1], "quality")
    result, out = harness_here(["report", "pair.yaml"], copy, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "restored quality of base-s0 from its MLflow run" in out
    assert "quality of base-s1 is damaged and MLflow has no copy: the report shows the run without it" in out
    html = said((copy / "reports" / "pair" / "index.html").read_text())
    assert f"quality of run base seed 1 ({keys[1]}) missing or unreadable, and not restored" in html
    runs = pd.read_parquet(copy / "results" / "pair" / "runs")
    assert set(runs["status"]) == {"finished"}  # a report trains nothing and changes no run's state
    assert verdict_n(copy) == 1


# ---------------------------------------------------------------- item 2: a reused key's source


def test_a_reused_source_with_a_damaged_table_is_repaired_from_mlflow_then_adopted(trained, copy, monkeypatch):
    _, keys = trained
    original = quality(copy, keys[0])
    truncate(copy / "results" / "pair" / "quality" / f"{keys[0]}.parquet")
    write_study(copy, "adopter", seeds="[0]")
    result, out = harness_here(["run", "adopter.yaml", "--no-report"], copy, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "restored quality of base-s0 in study pair from its MLflow run" in out, out
    assert "reused 1 finished run(s) from other studies" in out
    pd.testing.assert_series_equal(quality(copy, keys[0], "adopter"), original)
    pd.testing.assert_series_equal(quality(copy, keys[0]), original)


def test_a_reused_source_mlflow_cannot_repair_is_measured_from_its_checkpoint(trained, copy):
    _, keys = trained
    truncate(copy / "results" / "pair" / "quality" / f"{keys[0]}.parquet")
    drop_artifact(copy, keys[0], "quality")
    write_study(copy, "adopter", seeds="[0]")
    out, err = harness_process(["run", "adopter.yaml", "--no-report"], copy).communicate(timeout=900)
    text = said(out)
    assert "Traceback" not in out + err and "ArrowInvalid" not in out + err
    assert (
        "quality of base-s0 in study pair is damaged and its MLflow run has no copy: not reused; "
        "measured from the training pair finished" in text
    ), out + err
    assert "reused 1" not in text and "1 to run" in text
    runs = pd.read_parquet(copy / "results" / "adopter" / "runs")
    assert runs["status"].tolist() == ["finished"]
    measured = quality(copy, keys[0], "adopter")
    assert measured["resumed_from_step"] == measured["train_steps"] == 10


# ---------------------------------------------------------------- item 3: MLflow's history


def test_a_finished_run_whose_history_lost_points_is_completed(trained, copy, monkeypatch):
    """What a kill and a resume left under older code: a FINISHED run with its summary but only
    the last loss point, and no tag saying which rows its history covers."""
    _, keys = trained
    client, run = mlflow_run(copy, keys[0])
    train = pd.read_parquet(copy / "results" / "pair" / "train" / f"{keys[0]}.parquet")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(train) > 1
    with sqlite3.connect(copy / "mlflow.db") as db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND key = 'loss' AND step < 10", (run.info.run_id,))
        db.execute("DELETE FROM tags WHERE run_uuid = ? AND key = 'logged_rows'", (run.info.run_id,))
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1
    result, out = harness_here(["run", "pair.yaml", "--no-report"], copy, monkeypatch)
    assert result.exit_code == 0 and "0 to run" in out, result.output
    added = len(train) - 1
    assert f"completed 1 MLflow run(s) of pair from results/pair ({added} metric points added in all)" in out, out
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == train["step"].tolist()
    again, out = harness_here(["run", "pair.yaml", "--no-report"], copy, monkeypatch)
    assert again.exit_code == 0 and "completed" not in out  # the tag now says the history is whole


def test_a_resumed_run_gets_the_points_its_killed_attempt_lost(tmp_path, monkeypatch):
    """The first attempt's asynchronous logger lost two of four loss points when it was killed;
    the resumed attempt, which logs from its checkpoint on, finishes with all four."""
    from ddpm_engine import ExperimentConfig
    from harness.runs.lifecycle import RunState
    from harness.store.tracking import RunTracker, ensure_experiment
    from harness.study.plan import Arm, RunSpec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = ensure_experiment(client, "resumed")
    spec = RunSpec("resumed", Arm("base", {}, {}), 0, ExperimentConfig.from_dict({}), "a1b2c3d4e5f6")
    first = RunTracker(client, experiment_id, spec, tmp_path / "results", commit="abc")
    first.start()
    first.scalars(10, {"loss": 0.4})
    first.flush()  # steps 5 and 15 sat in the queue when the process was killed; 20 comes after the resume
    second = RunTracker(client, experiment_id, spec, tmp_path / "results", commit="abc")
    second.start()
    assert second.run_id == first.run_id
    second.scalars(20, {"loss": 0.2})
    second.table("train", pd.DataFrame({"step": [5, 10, 15, 20], "loss": [0.5, 0.4, 0.3, 0.2]}))
    second.finish({"seconds": 1.0})
    history = client.get_metric_history(second.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 0.5), (10, 0.4), (15, 0.3), (20, 0.2)]
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert pd.read_parquet(tmp_path / "results" / "resumed" / "runs")["status"].tolist() == [str(RunState.FINISHED)]


def test_adopting_twice_does_not_duplicate_points(trained, copy, monkeypatch):
    """A kill during an adoption, after its MLflow run was rebuilt and before its `runs` row:
    the next run adopts the key again into the same MLflow run, adding no point twice."""
    _, keys = trained
    write_study(copy, "adopter", seeds="[0]")
    result, out = harness_here(["run", "adopter.yaml", "--no-report"], copy, monkeypatch)
    assert result.exit_code == 0 and "reused 1 finished run(s)" in out, result.output
    client, run = mlflow_run(copy, keys[0], "adopter")
    counts = {name: len(client.get_metric_history(run.info.run_id, name)) for name in run.data.metrics}
    (copy / "results" / "adopter" / "runs" / f"{keys[0]}.parquet").unlink()
    client.update_run(run.info.run_id, status="RUNNING")
    again, out = harness_here(["run", "adopter.yaml", "--no-report"], copy, monkeypatch)
    assert again.exit_code == 0 and "reused 1 finished run(s)" in out, again.output
    client, rerun = mlflow_run(copy, keys[0], "adopter")  # still one run of the key
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    assert {name: len(client.get_metric_history(run.info.run_id, name)) for name in run.data.metrics} == counts
    train = pd.read_parquet(copy / "results" / "adopter" / "train" / f"{keys[0]}.parquet")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(train)


def test_an_adoption_killed_after_its_mlflow_run_finished_keeps_reused_from(trained, copy, monkeypatch):
    """A kill between the adopted key's FINISHED MLflow run and its `runs` row: the next run
    restores the key from that MLflow run, and the row still says where it came from (the
    tags are set before the run is FINISHED) and under which measure version."""
    _, keys = trained
    write_study(copy, "adopter", seeds="[0]")
    result, out = harness_here(["run", "adopter.yaml", "--no-report"], copy, monkeypatch)
    assert result.exit_code == 0 and "reused 1 finished run(s)" in out, result.output
    client, run = mlflow_run(copy, keys[0], "adopter")
    assert run.data.tags["reused_from"] == "pair"
    (copy / "results" / "adopter" / "runs" / f"{keys[0]}.parquet").unlink()  # the row a kill never wrote
    again, out = harness_here(["run", "adopter.yaml", "--no-report"], copy, monkeypatch)
    assert again.exit_code == 0, again.output
    row = pd.read_parquet(copy / "results" / "adopter" / "runs" / f"{keys[0]}.parquet").iloc[0]
    assert row["status"] == "finished"
    assert "reused from study pair" in row["note"]
    from ddpm_engine.metrics import MEASURE_VERSION

    assert int(row["measure_version"]) == MEASURE_VERSION  # not taken for an older one and re-measured
