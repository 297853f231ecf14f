"""Tuned ablations: every arm searched on its own, trials nested in MLflow, best value used."""

import os
import subprocess
import sys

import pyarrow.dataset as ds
from mlflow import MlflowClient

from harness.study.spec import load_study

STUDY = """\
study: tuned
question: Does each arm get its own learning rate?
base:
  model: {preset: tiny, base_channels: 16, time_embed_dim: 32}
  diffusion: {T: 20}
  train: {steps: 20, batch_size: 32, log_every: 5, warmup_steps: 2}
  sample: {num_samples: 16}
  eval: {probe_every: 5, probe_images: 32, drift_hist_steps: 5, quality: false}
ablations:
  timesteps:
    T20: {diffusion.T: 20}
    T10: {diffusion.T: 10}
tune:
  space:
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  trials: 2
  metric: heldout_loss
  steps: 10
seeds: [0]
"""


def test_tuned_smoke_study_end_to_end(tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text(STUDY)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    tuning = ds.dataset(str(tmp_path / "results/tuned/tuning"), format="parquet").to_table().to_pandas()
    assert sorted(tuning["arm"].unique()) == ["T10", "T20"]
    assert tuning.groupby("arm").size().eq(2).all()
    best = tuning[tuning["best"]].set_index("arm")["param.train.lr"].to_dict()
    assert set(best) == {"T10", "T20"} and all(1e-4 <= v <= 3e-3 for v in best.values())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tuned")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.data.tags["arm"]: r for r in runs if r.data.tags.get("tune_parent") == "true"}
    children = [r for r in runs if "tune_trial" in r.data.tags]
    assert set(parents) == {"T10", "T20"} and len(children) == 4
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[child.data.tags["arm"]].info.run_id
        assert "train.lr" in child.data.params
    replicates = [r for r in runs if "run_key" in r.data.tags]
    assert len(replicates) == 2
    for run in replicates:
        arm = run.data.tags["arm"]
        assert float(run.data.params["train.lr"]) == best[arm]
        assert run.data.params["train.steps"] == "20"  # replicates get the full budget
        assert float(parents[arm].data.params["best.train.lr"]) == best[arm]

    html = (tmp_path / "reports/tuned/index.html").read_text()
    assert "Tuning" in html
    for value in best.values():
        assert f"{value:.3g}" in html

    # a second run reuses the finished search and the finished replicates
    again = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(path), "--no-report"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)


def test_tune_block_errors_are_located(tmp_path):
    import pytest

    from harness.study.spec import StudyError

    bad = STUDY.replace("train.lr: {loguniform: [1.0e-4, 3.0e-3]}", "train.lrr: {loguniform: [1.0e-4, 3.0e-3]}")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(
        StudyError,
        match=r"bad.yaml:\d+: tune.space.train.lrr: no such engine config field \(did you mean 'train.lr'\?\)",
    ):
        load_study(path)
    path.write_text(STUDY.replace("metric: heldout_loss", "metric: heldout_los"))
    with pytest.raises(StudyError, match="did you mean 'heldout_loss'"):
        load_study(path)
    path.write_text(STUDY.replace("[1.0e-4, 3.0e-3]", "[3.0e-3, 1.0e-4]"))
    with pytest.raises(StudyError, match="lo < hi"):
        load_study(path)
