"""`harness run` end to end: the real CLI, a real MLflow store, real Parquet."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
from mlflow import MlflowClient

STUDY = """\
study: {name}
question: Does the harness run end to end?
base:
  model: {{preset: tiny, base_channels: 16, time_embed_dim: 32}}
  diffusion: {{T: 20}}
  train: {{steps: {steps}, batch_size: 32, log_every: 5, checkpoint_every: {ckpt}, warmup_steps: 2}}
  sample: {{num_samples: 16}}
  eval: {{probe_every: 10, probe_images: 32, drift_hist_steps: 5}}
ablations:
  timesteps:
    T20: {{diffusion.T: 20}}
    T10: {{diffusion.T: 10}}
seeds: [0, 1]
hypotheses:
  fewer_steps_leave_signal:
    says: T=10 with unscaled betas leaves more of the image in x_T than T=20
    metric: prior_bits
    arm: T10
    versus: baseline
    expect: above
    value: 0.0
  small_t_is_hard:
    metric: loss_small_minus_mid
    expect: above
    value: 0.0
"""


def write_study(folder: Path, name="smoke", steps=20, ckpt=10) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, steps=steps, ckpt=ckpt))
    return path


def harness(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
    )


def mlflow_runs(cwd: Path, study: str):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    return client, client.search_runs([experiment.experiment_id])


def table(cwd: Path, study: str, name: str):
    return ds.dataset(str(cwd / "results" / study / name), format="parquet").to_table()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("smoke")
    study = write_study(cwd)
    first = harness(["run", str(study), "--no-report"], cwd)
    assert first.returncode == 0, first.stdout + first.stderr
    return cwd, study, first


def test_smoke_study_is_tracked_in_mlflow(smoke):
    cwd, _, _ = smoke
    client, runs = mlflow_runs(cwd, "smoke")
    assert len(runs) == 4
    assert not (cwd / "mlruns").exists()  # a ./mlruns would hide mlflow.db from `mlflow ui`
    for run in runs:
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert {"study", "arm", "seed", "run_key", "ablation.timesteps", "git_commit"} <= set(tags)
        assert run.info.run_name == f"{tags['arm']}-s{tags['seed']}"
        assert run.data.params["diffusion.T"] == tags["arm"][1:]
        assert run.data.params["train.seed"] == tags["seed"]
        assert {"loss", "bpd", "heldout_loss", "fd", "final_mean_gap"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [5, 10, 15, 20]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config", "samples", "train", "per_t", "drift", "drift_hist", "quality", "probe"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "per_t")] == [f"per_t/{tags['run_key']}.parquet"]
        # per-t and drift curves as metrics, so MLflow's chart view overlays them across runs
        T = int(tags["arm"][1:])
        per_t = client.get_metric_history(run.info.run_id, "per_t/loss_mse")
        assert sorted(m.step for m in per_t) == list(range(1, T + 1))
        assert len(client.get_metric_history(run.info.run_id, "per_t/loss_best_ref")) == T
        drift = client.get_metric_history(run.info.run_id, "drift/mean")
        assert sorted(m.step for m in drift) == list(range(T + 1))  # x_T, then one per reverse step
        assert tags["mlflow.source.git.commit"] and tags["git_dirty"] in ("true", "false")
        assert "images" in artifacts  # the sample grid through log_image
        # the training split as the run's dataset input (through the slots' event queue)
        (training,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert training.dataset.name == "digits" and len(training.dataset.digest) == 16
        assert {(t.key, t.value) for t in training.tags} == {("mlflow.data.context", "training")}
    digests = {client.get_run(r.info.run_id).inputs.dataset_inputs[0].dataset.digest for r in runs}
    assert len(digests) == 1  # every arm and seed trains on the same split
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] == "Does the harness run end to end?"


def test_cpu_slots_default_to_one_per_core_and_runs_overlap(smoke):
    from harness.launch.slots import slot_devices

    cores = os.cpu_count() or 1
    assert slot_devices("cpu", None, runs=1) == [("cpu", cores)]  # a lone run gets every core
    assert slot_devices("cpu", None, runs=1000) == [("cpu", 1)] * cores
    assert slot_devices("cpu", 1, runs=4) == [("cpu", cores)]
    cwd, _, first = smoke
    expected = min(4, cores)
    assert f"{expected} slot(s) on cpu" in " ".join(first.stdout.split())
    if expected < 2:
        pytest.skip("one core: the runs cannot overlap")
    _, runs = mlflow_runs(cwd, "smoke")
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two runs ran at once"


def test_smoke_study_tables_read_back_with_pyarrow(smoke):
    cwd, _, _ = smoke
    runs = table(cwd, "smoke", "runs").to_pandas()
    assert len(runs) == 4 and set(runs["status"]) == {"finished"}
    assert {
        "run_key",
        "study",
        "arm",
        "seed",
        "timesteps",
        "status",
        "error",
        "mlflow_run_id",
        "params",
        "seconds",
        "config_json",
    } <= set(runs.columns)
    keys = set(runs["run_key"])
    expected_rows = {"train": 4, "quality": 1}
    for name, rows in expected_rows.items():
        frame = table(cwd, "smoke", name).to_pandas()
        assert set(frame["run_key"]) == keys
        assert frame.groupby("run_key").size().eq(rows).all()
    per_t = table(cwd, "smoke", "per_t")
    for column in (
        "run_key",
        "step",
        "t",
        "alphabar",
        "wt",
        "loss_mse",
        "eps_pred_mean",
        "eps_pred_std",
        "err_mean",
        "vlb_bits",
    ):
        assert column in per_t.schema.names
    per_t = per_t.to_pandas()
    t10 = runs.loc[runs["timesteps"] == "T10", "run_key"].iloc[0]  # noqa: F841 - used by the query
    assert sorted(per_t.query("run_key == @t10 and step == 20")["t"]) == list(range(1, 11))
    drift = table(cwd, "smoke", "drift").to_pandas().query("run_key == @t10")
    assert drift["t"].tolist() == list(range(10, -1, -1))
    for column in ("mean", "std", "p01", "p50", "p99", "frac_out", "ref_mean", "ref_std", "ref_frac_out"):
        assert drift[column].notna().all()
    hist = table(cwd, "smoke", "drift_hist").to_pandas()
    assert {"t", "bin_lo", "bin_hi", "count", "ref_count"} <= set(hist.columns)
    quality = table(cwd, "smoke", "quality").to_pandas()
    for column in (
        "bpd",
        "prior_bits",
        "l0_bits",
        "fd",
        "coverage",
        "final_mean_gap",
        "max_mean_gap",
        "hist_w1",
        "sat_frac",
    ):
        assert column in quality.columns


def test_without_a_terminal_each_ended_run_prints_a_line(smoke):
    import re

    _, _, first = smoke
    ended = re.findall(r"^finished T\d+-s\d \(\w{12}\) in \d+ s \[(\d)/4\]$", first.stdout, re.M)
    assert sorted(ended) == ["1", "2", "3", "4"], first.stdout


def test_second_run_runs_nothing(smoke):
    cwd, study, _ = smoke
    again = harness(["run", str(study), "--no-report"], cwd)
    assert again.returncode == 0, again.stderr
    assert "0 to run" in again.stdout
    _, runs = mlflow_runs(cwd, "smoke")
    assert len(runs) == 4


def test_report_judges_the_study_hypotheses(smoke):
    """prior_bits depends only on the schedule and the probe images: the same in every seed,
    a zero-width interval decided by its value (T10's L_T is larger than T20's)."""
    cwd, study, _ = smoke
    built = harness(["report", str(study)], cwd)
    assert built.returncode == 0, built.stderr
    rows = ds.dataset(str(cwd / "results" / "smoke" / "hypotheses.parquet")).to_table().to_pandas()
    assert sorted(zip(rows["name"], rows["arm"])) == [
        ("fewer_steps_leave_signal", "T10"),
        ("small_t_is_hard", "T10"),
        ("small_t_is_hard", "T20"),
    ]
    prior = rows[rows["name"] == "fewer_steps_leave_signal"].iloc[0]
    assert prior["n"] == 2 and prior["ci_low"] == prior["ci_high"] > 0
    assert prior["verdict"] == "supported" and prior["p_adjusted"] == 0.0
    html = (cwd / "reports" / "smoke" / "index.html").read_text()
    assert "T=10 with unscaled betas leaves more of the image in x_T than T=20" in html


def test_each_run_logs_its_training_split_as_an_mlflow_dataset(tmp_path):
    """Two splits of digits (split seeds 0 and 1) are two MLflow datasets: same name and
    source, different digests; the same split logged again (a resumed run) stays one input."""
    import json

    from ddpm_engine import ExperimentConfig
    from ddpm_engine.data import describe_split, load_data
    from harness.store.tracking import RunTracker, ensure_experiment
    from harness.study.plan import Arm, RunSpec

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = ensure_experiment(client, "splits")
    logged = {}
    for split_seed in (0, 1):
        config = ExperimentConfig.from_dict({"data": {"split_seed": split_seed}})
        spec = RunSpec("splits", Arm(f"split{split_seed}", {}, {}), 0, config, f"key{split_seed:09d}")
        tracker = RunTracker(client, experiment, spec, tmp_path / "results", commit="abc")
        tracker.start()
        row = pd.DataFrame([describe_split(load_data(config.data), config.data)])
        tracker.table("dataset", row)
        tracker.table("dataset", row)  # a resumed run emits it again
        (logged[split_seed],) = client.get_run(tracker.run_id).inputs.dataset_inputs
        parquet = pd.read_parquet(tmp_path / "results" / "splits" / "dataset" / f"{spec.key}.parquet")
        assert parquet["digest"].item() == logged[split_seed].dataset.digest
    first, second = logged[0].dataset, logged[1].dataset
    assert first.name == second.name == "digits"
    assert first.digest != second.digest
    assert first.source_type == "code"
    assert json.loads(first.source) == {"tags": {"mlflow.source.name": "sklearn.datasets.load_digits"}}
    assert json.loads(first.profile) == {"num_rows": 1617, "heldout_images": 180, "shape": [1, 8, 8], "levels": 17}


def test_mlflow_ui_chart_view_draws_per_t_loss_one_line_per_run(smoke, tmp_path):
    """The real `mlflow server` on the smoke study's store, opened in headless Chromium at the
    chart view (``tracking.chart_view_route``) and narrowed with its chart search: the
    per_t/loss_mse chart is there with one series and one legend entry per run, each series over
    its own t = 1..T (T20's 20 points, T10's 10). Fails if per-t metrics stop being logged, or if
    the route stops leading to the chart view. About 45 s beside the smoke study on 2 cores."""
    import socket
    import urllib.request

    from browser import DevTools, require_chromium

    from harness.store.tracking import chart_view_route

    require_chromium()
    cwd, _, _ = smoke
    client, runs = mlflow_runs(cwd, "smoke")
    expected = {r.info.run_name: int(r.data.tags["arm"][1:]) for r in runs}  # run name -> T
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # no job runners: else the server starts seven huey consumer processes, each importing mlflow
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{cwd / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers die with it (killpg below)
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        experiment_id = client.get_experiment_by_name("smoke").experiment_id
        with DevTools(tmp_path / "profile") as page:
            page.navigate(base + chart_view_route(experiment_id))
            # the chart search, as a user narrows ~60 charts to one: the UI draws only the charts in
            # view, and drawing them all (each a metric-history request) took minutes on 2 cores
            search = "document.querySelector('input[placeholder=\"Search metric charts\"]')"
            assert page.wait_for(f"{search} !== null", timeout=45), page.evaluate("document.body.innerText")[:2000]
            page.evaluate(f"{search}.focus()")
            page.send("Input.insertText", text="per_t/loss_mse")
            chart = page.wait_for(PER_T_LOSS_SERIES, timeout=45)
            where = page.evaluate("location.hash")
            if not chart:
                page.screenshot(tmp_path / "chart-view.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert "compareRunsMode=CHART" in where and "workflowType=machine_learning" in where, where
    assert chart, f"no per_t/loss_mse chart in the chart view (screenshot: {tmp_path / 'chart-view.png'})"
    assert set(chart["series"]) == set(expected), chart
    for name, T in expected.items():
        assert chart["series"][name] == list(range(1, T + 1)), (name, chart["series"][name])
    assert sorted(chart["legend"]) == sorted(f"{name} (per_t/loss_mse)" for name in expected), chart["legend"]


# The per_t/loss_mse chart card of MLflow's chart view, once plotly has drawn every run into it:
# {series: {run name: sorted t}, legend: [entries]}, else null. MLflow draws each run twice (the
# raw points and a smoothed line) under the run's name; its legend is its own HTML, one per run.
PER_T_LOSS_SERIES = """(() => {
  const title = [...document.querySelectorAll('h4')].find(h => h.textContent.trim() === 'per_t/loss_mse');
  const card = title && title.closest('.react-resizable');
  const plot = card && card.querySelector('.js-plotly-plot');
  if (!plot || !plot.data || !plot.data.length || !card.querySelector('.scatterlayer .trace')) return null;
  const series = {};
  for (const trace of plot.data) {
    const ts = new Set([...(series[trace.name] || []), ...Array.from(trace.x || [], Number)]);
    series[trace.name] = [...ts].sort((a, b) => a - b);
  }
  const legend = [...card.querySelectorAll('*')]
    .filter(e => e.childElementCount === 0 && / \\(per_t\\/loss_mse\\)$/.test(e.textContent.trim()))
    .map(e => e.textContent.trim());
  return {series, legend};
})()"""


def test_sigkill_mid_training_resumes_from_checkpoint(tmp_path):
    study = write_study(tmp_path, name="killed", steps=200, ckpt=20)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(study), "--no-report"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = tmp_path / "results" / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoints.glob("*/last.pt")):
        time.sleep(0.2)
    assert list(checkpoints.glob("*/last.pt")), "no checkpoint appeared"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_training = list(checkpoints.glob("*/last.pt"))[0].parent.name  # checkpoints live under the train key
    from harness.study.plan import expand
    from harness.study.spec import load_study

    (killed_key,) = [s.key for s in expand(load_study(study)) if s.train_key == killed_training]
    # The slots train while the parent, the one MLflow writer, opens the runs: on a loaded
    # machine the kill can come before the killed key's MLflow run exists. Then there is no
    # run to reopen, and "resumed" (a reopened MLflow run) cannot be asked of it; the
    # checkpoint's resume (resumed_from_step) is asked either way.
    had_mlflow_run = False
    if (tmp_path / "mlflow.db").exists():
        from mlflow.exceptions import MlflowException

        try:
            client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            experiment = client.get_experiment_by_name("killed")
            before = client.search_runs([experiment.experiment_id]) if experiment else []
            had_mlflow_run = any(r.data.tags.get("run_key") == killed_key for r in before)
        except MlflowException:  # a store the kill left half-made: harness run repairs it
            had_mlflow_run = False

    again = harness(["run", str(study), "--no-report"], tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    client, runs = mlflow_runs(tmp_path, "killed")
    keys = [r.data.tags["run_key"] for r in runs]
    assert len(runs) == 4 and len(set(keys)) == 4, "exactly one MLflow run per key"
    assert all(r.info.status == "FINISHED" for r in runs)
    resumed = next(r for r in runs if r.data.tags["run_key"] == killed_key)
    if had_mlflow_run:
        assert resumed.data.tags.get("resumed") == "true"
    assert resumed.data.metrics["resumed_from_step"] >= 20
    train = table(tmp_path, "killed", "train").to_pandas()
    assert not train.duplicated(["run_key", "step"]).any()
    assert train.groupby("run_key").size().eq(40).all()
    assert len(table(tmp_path, "killed", "runs").to_pandas()) == 4


def test_a_failing_run_is_recorded_and_retried_alone(tmp_path):
    study = write_study(tmp_path, name="flaky")
    plan = harness(["status", str(study)], tmp_path)
    assert plan.returncode == 0, plan.stderr
    # Block one run's checkpoint folder with a file: saving its checkpoint raises.
    from harness.study.plan import expand
    from harness.study.spec import load_study

    specs = expand(load_study(study))
    victim = specs[0]
    blocker = tmp_path / "results" / "flaky" / "checkpoints" / victim.train_key
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")

    first = harness(["run", str(study), "--no-report"], tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    client, runs = mlflow_runs(tmp_path, "flaky")
    by_key = {r.data.tags["run_key"]: r for r in runs}
    assert by_key[victim.key].info.status == "FAILED"
    assert "Error" in by_key[victim.key].data.tags["error"]
    assert sum(r.info.status == "FINISHED" for r in runs) == 3
    rows = table(tmp_path, "flaky", "runs").to_pandas().set_index("run_key")
    assert rows.loc[victim.key, "status"] == "failed" and rows.loc[victim.key, "error"]

    # without --retry-failed nothing runs; with it only the failed key runs
    again = harness(["run", str(study), "--no-report"], tmp_path)
    assert again.returncode == 1 and "0 to run" in again.stdout
    blocker.unlink()
    finished_before = {k: r.info.end_time for k, r in by_key.items() if r.info.status == "FINISHED"}
    retry = harness(["run", str(study), "--no-report", "--retry-failed"], tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "1 to run" in retry.stdout
    client, runs = mlflow_runs(tmp_path, "flaky")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all("error" not in r.data.tags for r in runs)  # the failed attempt's reason is gone once it finished
    for run in runs:
        if run.data.tags["run_key"] in finished_before:
            assert run.info.end_time == finished_before[run.data.tags["run_key"]]


def test_arm_option_runs_a_subset_and_leaves_the_rest_pending(tmp_path):
    study = write_study(tmp_path, name="subset", steps=10, ckpt=10)
    typo = harness(["run", str(study), "--arm", "T11"], tmp_path)
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "--arm 'T11'" in typo.stderr and "did you mean 'T10'" in typo.stderr and "Traceback" not in typo.stderr

    first = harness(["run", str(study), "--arm", "T10"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 to run" in first.stdout
    _, runs = mlflow_runs(tmp_path, "subset")
    assert sorted(r.data.tags["arm"] for r in runs) == ["T10", "T10"]
    status = harness(["status", str(study)], tmp_path)
    assert status.stdout.count("pending") == 2 and status.stdout.count("finished") == 2
    html = (tmp_path / "reports" / "subset" / "index.html").read_text()
    assert "T20" in html and "pending" in html  # the arm not chosen is shown as not run

    rest = harness(["run", str(study), "--no-report"], tmp_path)
    assert rest.returncode == 0 and "2 to run" in rest.stdout, rest.stdout + rest.stderr


def test_an_unusable_tracking_store_is_one_clear_error(tmp_path):
    study = write_study(tmp_path, name="nostore", steps=10, ckpt=10)
    (tmp_path / "a-file").write_text("not a folder")  # so no database can be created below it
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/a-file/mlflow.db"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(study), "--no-report"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot use the MLflow tracking store sqlite:///" in proc.stderr and "Traceback" not in proc.stderr
    # the slots, already started, were stopped before any run was recorded
    assert not (tmp_path / "results" / "nostore" / "runs").exists()


# The smallest base config that runs every phase of a run: for end-to-end studies of the harness.
TINY_BASE = """\
base:
  model: {preset: tiny, base_channels: 16, time_embed_dim: 32}
  diffusion: {T: 20}
  train: {steps: 10, batch_size: 32, log_every: 5, warmup_steps: 2}
  sample: {num_samples: 16}
  eval: {probe_every: 10, probe_images: 32, drift_hist_steps: 5}
"""

REFERENCE_STUDY = (
    """\
study: with_reference
question: Does a parameter-free reference denoiser run as an arm beside a trained one?
"""
    + TINY_BASE
    + """\
ablations:
  denoiser:
    unet: {model.preset: tiny}
    wiener: {model.preset: gaussian}
    memoriser: {model.preset: empirical}
seeds: [0]
"""
)


def test_reference_arms_run_end_to_end_without_training(tmp_path):
    study = tmp_path / "with_reference.yaml"
    study.write_text(REFERENCE_STUDY)
    plan = harness(["plan", str(study)], tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "never trained (train.* ignored): wiener (gaussian), memoriser (empirical)" in " ".join(plan.stdout.split())
    assert "1 seed: no confidence interval at all" in " ".join(plan.stdout.split())
    done = harness(["run", str(study)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = table(tmp_path, "with_reference", "runs").to_pandas().set_index("arm")
    assert set(runs["status"]) == {"finished"}
    quality = table(tmp_path, "with_reference", "quality").to_pandas().set_index("run_key")
    wiener, memoriser = (quality.loc[runs.loc[arm, "run_key"]] for arm in ("wiener", "memoriser"))
    assert wiener["params"] == 0 and wiener["train_steps"] == 0
    assert memoriser["nn_train_dist"] < 1e-3 < quality.loc[runs.loc["unet", "run_key"], "nn_train_dist"]
    per_t = table(tmp_path, "with_reference", "per_t").to_pandas()
    assert per_t["loss_best_ref"].notna().all() and set(per_t["best_ref_denoiser"]) <= {
        "pixelwise",
        "gaussian",
        "empirical",
        "median",
    }
    # a reference arm is probed once (step 0); its own loss is never below the best reference it is part of
    wiener_rows = per_t[per_t["run_key"] == runs.loc["wiener", "run_key"]]
    assert set(wiener_rows["step"]) == {0}
    assert (wiener_rows["loss_mse"] >= wiener_rows["loss_best_ref"] - 1e-6).all()
    assert (wiener_rows["loss_mse"] - wiener_rows["ref_loss_gaussian"]).abs().max() < 1e-4
    html = (tmp_path / "reports" / "with_reference" / "index.html").read_text()
    assert "best reference" in html and "start gap at t = T" in html
    # one sampler-check row: every arm shares the schedule and sampler
    checks = ds.dataset(str(tmp_path / "results" / "with_reference" / "sampler_check.parquet")).to_table().to_pandas()
    assert len(checks) == 1 and checks["arms"].iloc[0] == "unet, wiener, memoriser"
    assert 0 < checks["prior_mean_gap"].iloc[0] < 1 and checks["T"].iloc[0] == 20


def test_two_concurrent_runs_of_one_study_train_each_key_once(tmp_path):
    """Two `harness run` of one study started together in a fresh folder (issue: every key was
    trained twice, MLflow histories interleaved, or the second died creating the store)."""
    study = write_study(tmp_path, name="twice")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "harness.cli", "run", str(study), "--no-report", "--workers", "1"]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = " ".join(" ".join(out.split()) for out, _ in outputs)
    assert "being run by another harness process" in said or "0 to run" in said
    client, runs = mlflow_runs(tmp_path, "twice")
    keys = [r.data.tags["run_key"] for r in runs]
    assert len(keys) == 4 and len(set(keys)) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # one training per key: no second history interleaved into the first
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20]
    rows = table(tmp_path, "twice", "runs").to_pandas()
    assert len(rows) == 4 and set(rows["status"]) == {"finished"}
