"""Evaluation draws per replicate, and measuring again without training again.

Replicate s samples and probes on draws derived from (base seed, s): every arm of s shares
them (common random numbers), other replicates get others, so the spread over seeds holds the
evaluation noise. A finished run measured under an older MEASURE_VERSION, or a run that
differs from another only in `sample.*` / `eval.*`, is measured from the finished training's
checkpoint instead of being trained again.
"""

import json

import pandas as pd
import pyarrow.dataset as ds
import pytest
from test_harness_run import harness

from ddpm_engine.config import ExperimentConfig, replicate_seed
from ddpm_engine.metrics import MEASURE_VERSION
from harness.store.history import logged_points
from harness.study.plan import expand, run_key, train_key
from harness.study.spec import load_study


def test_replicate_draws_are_shared_by_arms_and_differ_across_replicates():
    tiny = ExperimentConfig.model_validate({"model": {"preset": "tiny"}, "train": {"seed": 0}})
    other_arm = ExperimentConfig.model_validate({"model": {"preset": "gaussian"}, "train": {"seed": 0}})
    next_replicate = ExperimentConfig.model_validate({"model": {"preset": "tiny"}, "train": {"seed": 1}})
    assert tiny.sample_draw_seed == other_arm.sample_draw_seed
    assert tiny.probe_draw_seed == other_arm.probe_draw_seed
    assert tiny.sample_draw_seed != next_replicate.sample_draw_seed
    assert tiny.probe_draw_seed != next_replicate.probe_draw_seed
    # the sampling and probe streams of one replicate are unrelated, and neither is the
    # neighbouring replicate's stream of the other
    seeds = {replicate_seed(b, s) for b in (1234, 4321) for s in range(50)}
    assert len(seeds) == 100


def test_train_key_ignores_only_the_measurement_sections():
    base = ExperimentConfig.model_validate({"train": {"seed": 3}})
    ddim = ExperimentConfig.model_validate({"train": {"seed": 3}, "sample": {"sampler": "ddim", "steps": 10}})
    probed = ExperimentConfig.model_validate({"train": {"seed": 3}, "eval": {"probe_images": 17}})
    more_steps = ExperimentConfig.model_validate({"train": {"seed": 3, "steps": 7}})
    assert run_key(base, 3) != run_key(ddim, 3)
    assert train_key(base, 3) == train_key(ddim, 3) == train_key(probed, 3)
    assert train_key(base, 3) != train_key(more_steps, 3)
    assert train_key(base, 3) != train_key(base, 4)
    assert train_key(base.to_dict(), 3) == train_key(base, 3)


REFERENCE_STUDY = """\
study: draws
question: Do replicates get their own evaluation draws?
base:
  model: {preset: gaussian}
  diffusion: {T: 20}
  sample: {num_samples: 16}
  eval: {probe_images: 32, drift_hist_steps: 5}
ablations:
  denoiser:
    wiener: {model.preset: gaussian}
    pixelwise: {model.preset: pixelwise}
seeds: [0, 1]
"""


def test_harness_run_gives_each_replicate_its_own_x_T(tmp_path):
    """Reference arms (no training): x_T's pixel statistics at t = T (the drift table's first
    row) are the same across arms of one seed and differ across the seeds of one arm; so do
    the probe's losses of one denoiser."""
    (tmp_path / "draws.yaml").write_text(REFERENCE_STUDY)
    result = harness(["run", "draws.yaml", "--no-report"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = tmp_path / "results" / "draws"
    runs = ds.dataset(str(results / "runs"), format="parquet").to_table().to_pandas()
    drift = ds.dataset(str(results / "drift"), format="parquet").to_table().to_pandas()
    start = drift.sort_values("t").groupby("run_key").last()  # t = T: x_T before any step
    by = runs.set_index("run_key")[["arm", "seed"]].join(start[["mean", "std"]])
    x_T = {(row.arm, row.seed): (row.mean, row.std) for row in by.itertuples()}
    assert x_T["wiener", 0] == x_T["pixelwise", 0]
    assert x_T["wiener", 1] == x_T["pixelwise", 1]
    assert x_T["wiener", 0] != x_T["wiener", 1]
    per_t = ds.dataset(str(results / "per_t"), format="parquet").to_table().to_pandas()
    loss = per_t.merge(runs[["run_key", "arm", "seed"]], on="run_key").query("arm == 'wiener' and t == 10")
    assert loss["loss_mse"].nunique() == 2  # the probe noise differs between the two replicates
    assert set(runs["measure_version"]) == {MEASURE_VERSION}
    # a reference arm has no checkpoint and needs none: an outdated one is simply measured again
    target = next((results / "runs").iterdir())
    row = pd.read_parquet(target)
    row["measure_version"] = 1
    row.to_parquet(target)
    again = harness(["run", "draws.yaml", "--no-report"], tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-measuring 1 finished run(s)" in " ".join(again.stdout.split())
    assert int(pd.read_parquet(target)["measure_version"].iloc[0]) == MEASURE_VERSION


SAMPLER_STUDY = """\
study: samplers
question: Does one training serve two samplers?
base:
  model: {preset: tiny, base_channels: 16, time_embed_dim: 32}
  diffusion: {T: 20}
  train: {steps: 12, batch_size: 16, log_every: 4, checkpoint_every: 6, warmup_steps: 2}
  sample: {num_samples: 8}
  eval: {probe_every: 6, probe_images: 16, drift_hist_steps: 5, quality: false}
ablations:
  sampler:
    ancestral: {sample.sampler: ddpm}
    ddim: {sample.sampler: ddim, sample.steps: 5}
seeds: [0]
"""


def mlflow_runs_of(cwd, key):
    """(a client, the live MLflow runs of ``key`` in the samplers study)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("samplers")
    return client, client.search_runs([experiment.experiment_id], f"tags.run_key = '{key}'")


def _tables(results, name):
    return ds.dataset(str(results / name), format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def sampler_study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("samplers")
    (cwd / "samplers.yaml").write_text(SAMPLER_STUDY)
    first = harness(["run", "samplers.yaml", "--no-report", "--workers", "2"], cwd)
    assert first.returncode == 0, first.stdout + first.stderr
    return cwd, first


def test_arms_differing_only_in_the_sampler_train_once(sampler_study):
    cwd, first = sampler_study
    assert "trained once" in first.stdout
    results = cwd / "results" / "samplers"
    quality = _tables(results, "quality").merge(_tables(results, "runs")[["run_key", "arm"]], on="run_key")
    # one arm trained from step 0; the other started from its finished checkpoint at step 12
    assert sorted(quality["resumed_from_step"]) == [0.0, 12.0]
    assert set(quality["train_steps"]) == {12.0}
    train = _tables(results, "train")
    curves = [group.drop(columns="run_key").reset_index(drop=True) for _, group in train.groupby("run_key")]
    pd.testing.assert_frame_equal(curves[0], curves[1])  # the same training, twice recorded
    assert len(list((results / "checkpoints").iterdir())) == 1


def test_a_run_measured_under_an_older_version_is_measured_again_not_retrained(sampler_study):
    cwd, _ = sampler_study
    results = cwd / "results" / "samplers"
    runs_folder = results / "runs"
    target = sorted(runs_folder.iterdir())[0]
    key = target.stem
    row = pd.read_parquet(target)
    row["measure_version"] = 1  # as older code recorded it
    row.to_parquet(target)
    train_before = pd.read_parquet(results / "train" / f"{key}.parquet")
    _, (old_run,) = mlflow_runs_of(cwd, key)
    again = harness(["run", "samplers.yaml", "--no-report"], cwd)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-measuring 1 finished run(s)" in again.stdout
    assert int(pd.read_parquet(target)["measure_version"].iloc[0]) == MEASURE_VERSION
    quality = pd.read_parquet(results / "quality" / f"{key}.parquet")
    assert float(quality["resumed_from_step"].iloc[0]) == 12.0  # restored at its last step: nothing trained
    pd.testing.assert_frame_equal(pd.read_parquet(results / "train" / f"{key}.parquet"), train_before)
    config = json.loads(pd.read_parquet(target)["config_json"].iloc[0])
    assert config["train"]["steps"] == 12
    # MLflow as Parquet: one live run of the key, one point per step of every metric (the
    # final metrics were logged a second time at their steps into the old run), the training
    # curve of the train table, the re-measured summary; the old run deleted, naming its successor
    client, (run,) = mlflow_runs_of(cwd, key)
    assert run.info.run_id != old_run.info.run_id and run.info.status == "FINISHED"
    assert pd.read_parquet(target)["mlflow_run_id"].iloc[0] == run.info.run_id
    superseded = client.get_run(old_run.info.run_id)
    assert superseded.info.lifecycle_stage == "deleted"
    assert superseded.data.tags["superseded_by"] == run.info.run_id
    spec = next(s for s in expand(load_study(cwd / "samplers.yaml")) if s.key == key)
    expected = logged_points(cwd / "results", spec)  # each metric's (step, value) as the tables hold them
    assert set(run.data.metrics) == set(expected)
    for name, points in expected.items():
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted((m.step, m.value) for m in history) == sorted(points), name
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == sorted(train_before["step"])
    per_t = pd.read_parquet(results / "per_t" / f"{key}.parquet")
    final = per_t[per_t["step"] == per_t["step"].max()].set_index("t")["loss_mse"]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "per_t/loss_mse")}
    assert logged == pytest.approx(final.to_dict())
    assert run.data.metrics["hist_w1"] == pytest.approx(float(quality["hist_w1"].iloc[0]))
    # and a third run has nothing left to do
    third = harness(["run", "samplers.yaml", "--no-report"], cwd)
    assert third.returncode == 0 and "re-measuring" not in third.stdout


def test_temp_files_a_killed_run_left_are_removed_once_their_key_is_claimed(tmp_path):
    """A SIGKILL mid-write leaves `<target>.<random>.tmp` behind (atomic_write's cleanup never
    runs). The next `harness run` removes those of the keys it claims and old study-level
    ones; a temp file of a key it does not hold (another study's) is left alone."""
    import os

    from harness.study.plan import expand
    from harness.study.spec import load_study

    (tmp_path / "draws.yaml").write_text(REFERENCE_STUDY)
    spec = expand(load_study(tmp_path / "draws.yaml"))[0]
    study = tmp_path / "results" / "draws"
    mine = [
        study / "quality" / f"{spec.key}.parquet.k1ll3d.tmp",
        study / "checkpoints" / spec.train_key / "last.pt.k1ll3d.tmp",
        study / "study.json.k1ll3d.tmp",
    ]
    other = tmp_path / "results" / "other" / "quality" / f"{spec.key}.parquet.busy.tmp"
    for path in [*mine, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    os.utime(mine[2], (0, 0))  # a study-level temp file from long ago
    result = harness(["run", "draws.yaml", "--no-report"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed 3 temp file(s) a killed run left half written" in " ".join(result.stdout.split())
    assert not any(p.exists() for p in mine)
    assert other.exists()
