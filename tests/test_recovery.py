"""Nothing lost, nothing run twice: `harness run` after a store or a results folder was lost,
damaged or half written, after a double Ctrl-C, on a full or read-only disk. The real CLI, a
real MLflow SQLite store read back with MlflowClient, real Parquet.

One tiny study is trained once (module fixture); each case copies its folder and breaks the
copy. `harness run` of a study with nothing to train runs in-process (no slot starts)."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from harness.cli import app

STUDY = """\
study: {name}
question: Is anything lost?
base:
  data: {{max_images: 300}}  # small and quick: the floors, drift and samples scale with the images
  model: {{preset: tiny, base_channels: 16, time_embed_dim: 32}}
  diffusion: {{T: 10}}
  train: {{steps: {steps}, batch_size: {batch}, log_every: 5, checkpoint_every: {ckpt}, warmup_steps: 2}}
  sample: {{num_samples: 16}}
  eval: {{probe_every: 10, probe_images: 32, drift_hist_steps: 5, quality: false}}
seeds: [0]
"""


def write_study(folder: Path, name: str, steps: int = 10, ckpt: int = 10, batch: int = 32) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, steps=steps, ckpt=ckpt, batch=batch))
    return path


def harness_process(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def harness_here(args, cwd: Path, monkeypatch):
    """`harness` in this process, in ``cwd`` with its ./mlflow.db (environment restored after)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "2")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = CliRunner().invoke(app, args)
    return result, " ".join(result.output.split())


def the_run(cwd: Path, study: str = "kept"):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    (run,) = client.search_runs([experiment.experiment_id])
    return client, client.get_run(run.info.run_id)


def history_counts(client: MlflowClient, run) -> dict[str, int]:
    return {name: len(client.get_metric_history(run.info.run_id, name)) for name in run.data.metrics}


def parquet(cwd: Path, table: str, study: str = "kept") -> pd.DataFrame:
    return pd.read_parquet(cwd / "results" / study / table)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A finished one-run study: its folder, and what MLflow holds of the run."""
    cwd = tmp_path_factory.mktemp("kept")
    study = write_study(cwd, "kept")
    out, err = harness_process(["run", str(study), "--no-report"], cwd).communicate(timeout=600)
    assert "finished" in out, out + err
    client, run = the_run(cwd)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    return cwd, history_counts(client, run), run, artifacts


def copy_study_folder(source: Path, target: Path) -> Path:
    """A copy of a finished study's folder whose MLflow store points at the copy's own
    artifacts (the store records absolute artifact paths)."""
    shutil.copytree(source, target)
    with sqlite3.connect(target / "mlflow.db") as db:
        old, new = source.as_uri(), target.as_uri()
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return target


@pytest.fixture
def copy_of(kept, tmp_path):
    """A copy of the finished study's folder whose store points at the copy's own artifacts."""
    return copy_study_folder(kept[0], tmp_path / "study")


# ---------------------------------------------------------------- MLflow lost or damaged


def test_a_deleted_mlflow_db_is_rebuilt_from_results(kept, copy_of, monkeypatch):
    _, counts, original, artifacts = kept
    (copy_of / "mlflow.db").unlink()
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "0 to run" in out and "rebuilt 1 MLflow run(s) of kept from results/kept" in out
    client, run = the_run(copy_of)
    assert run.info.status == "FINISHED" and run.info.run_id != original.info.run_id
    assert history_counts(client, run) == counts  # every point of every metric, the loss history included
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(parquet(copy_of, "train"))
    assert run.data.params == original.data.params
    for tag in ("study", "arm", "seed", "run_key"):
        assert run.data.tags.get(tag) == original.data.tags.get(tag)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == artifacts
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [
        i.dataset.digest for i in original.inputs.dataset_inputs
    ]
    assert parquet(copy_of, "runs")["mlflow_run_id"].tolist() == [run.info.run_id]
    again, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert again.exit_code == 0 and "rebuilt" not in out  # once is enough


def test_a_history_cut_short_is_completed_from_results(kept, copy_of, monkeypatch):
    """A kill as the run finished: MLflow kept 1 point of its metrics and the run RUNNING,
    results/ has it finished. The next run, with nothing to train, completes the history."""
    _, counts, original, _ = kept
    with sqlite3.connect(copy_of / "mlflow.db") as db:  # the state a kill leaves: later points never sent
        run_id = original.info.run_id
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND NOT (key = 'loss' AND step = 5)", (run_id,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ? AND key != 'loss'", (run_id,))
        db.execute("UPDATE latest_metrics SET step = 5 WHERE run_uuid = ?", (run_id,))
        db.execute("UPDATE runs SET status = 'RUNNING', end_time = NULL WHERE run_uuid = ?", (run_id,))
    client, run = the_run(copy_of)
    assert sum(history_counts(client, run).values()) == 1
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 0, result.output
    assert (
        "0 to run" in out and f"completed 1 MLflow run(s) of kept from results/kept ({sum(counts.values()) - 1}" in out
    )
    client, run = the_run(copy_of)
    assert run.info.run_id == original.info.run_id and run.info.status == "FINISHED"
    assert history_counts(client, run) == counts
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == parquet(copy_of, "train")["step"].tolist()


def half_made_store(path: Path, revision: str, then: str) -> None:
    """What a kill leaves while MLflow creates a store: its initial tables, the migrations up
    to ``revision``, then the first statement of the next one (``then``) and no more. Built
    with MLflow's own alembic set-up, as `mlflow db upgrade` runs it."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine_with_retry
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{path}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    with engine.begin() as connection:
        connection.exec_driver_sql(then)
    engine.dispose()


@pytest.mark.parametrize(
    ("revision", "then", "outcome", "kept_as"),
    [
        # killed inside the batch migration of latest_metrics (39d1c3be5f05): MLflow then fails
        # with "table _alembic_tmp_latest_metrics already exists"
        (
            "a8c4a736bde6",
            "CREATE TABLE _alembic_tmp_latest_metrics AS SELECT * FROM latest_metrics WHERE 0",
            "repaired (dropped _alembic_tmp_latest_metrics; schema migrated by MLflow)",
            "mlflow.db.before-repair-",
        ),
        # killed after the first column of cbc13b556ace: "duplicate column name: client_request_id"
        (
            "bda7b8c39065",
            "ALTER TABLE trace_info ADD COLUMN client_request_id VARCHAR(50)",
            "could not be repaired (OperationalError",
            "mlflow.db.broken-",
        ),
    ],
    ids=["leftover_table", "half_applied_migration"],
)
def test_a_half_made_mlflow_db_is_mended_before_anything_trains(copy_of, monkeypatch, revision, then, outcome, kept_as):
    store = copy_of / "mlflow.db"
    store.unlink()
    half_made_store(store, revision, then)
    probe = shutil.copy(store, copy_of / "probe.db")  # (MLflow keeps a connection per URI: not the store's own)
    with pytest.raises(OperationalError, match="already exists|duplicate column"):  # MLflow itself refuses it
        MlflowClient(f"sqlite:///{probe}").search_experiments()
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"the MLflow store {store} was half made (" in out and outcome in out, out
    assert "0 to run" in out and "rebuilt 1 MLflow run(s) of kept from results/kept" in out
    assert len(list(copy_of.glob(kept_as + "*"))) == 1
    client, run = the_run(copy_of)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(parquet(copy_of, "train"))


# ---------------------------------------------------------------- results lost


def test_a_deleted_results_folder_is_restored_from_mlflow_not_retrained(kept, copy_of, monkeypatch):
    train_before = parquet(copy_of, "train")
    shutil.rmtree(copy_of / "results")
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "0 to run" in out and "restored 1 run(s) of kept that MLflow finished" in out, out
    assert not (copy_of / "results" / "kept" / "checkpoints").exists()  # nothing trained
    runs = parquet(copy_of, "runs")
    assert runs["status"].tolist() == ["finished"] and runs["mlflow_run_id"].tolist() == [kept[2].info.run_id]
    pd.testing.assert_frame_equal(parquet(copy_of, "train"), train_before)
    for table in ("dataset", "per_t", "probe", "drift", "drift_hist", "quality"):
        assert len(parquet(copy_of, table)) > 0
    assert (copy_of / "results" / "kept" / "samples").is_dir()


def test_what_mlflow_cannot_give_back_is_named(kept, copy_of, monkeypatch):
    shutil.rmtree(copy_of / "results")
    run_id = kept[2].info.run_id
    (quality,) = copy_of.glob(f"mlartifacts/*/{run_id}/artifacts/quality")
    shutil.rmtree(quality)
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 0 and "0 to run" in out, result.output
    key = kept[2].data.tags["run_key"]
    assert f"base-s0 ({key}): its MLflow run has no quality artifacts" in out
    assert parquet(copy_of, "runs")["status"].tolist() == ["finished"]  # not trained again
    assert not (copy_of / "results" / "kept" / "quality").exists()


# ---------------------------------------------------------------- a moved project folder


def moved_folder(kept, tmp_path: Path) -> tuple[Path, Path]:
    """The finished study's folder as it was (``old``), then moved whole to ``new``: its
    store still names ``old`` for every artifact."""
    old = copy_study_folder(kept[0], tmp_path / "old")
    new = tmp_path / "new"
    shutil.move(old, new)
    return old, new


def test_a_moved_folder_s_store_is_pointed_at_its_artifacts(kept, tmp_path, monkeypatch):
    """`mv` of the whole project folder: MLflow's copy of every table is there, under the new
    folder; `harness report` and `harness run` say so and point the store at it, so a lost
    table is restored from it (not "MLflow has no copy") and a lost results/ comes back
    without training; nothing is written to the old place."""
    old, new = moved_folder(kept, tmp_path)
    key = kept[2].data.tags["run_key"]
    (new / "results" / "kept" / "quality" / f"{key}.parquet").unlink()
    result, out = harness_here(["report", "kept.yaml"], new, monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"kept the artifacts of study kept under {old}/mlartifacts/kept, which no longer exists" in out, out
    assert f"it now points at {new}/mlartifacts/kept, where 1 of its 1 run(s) have theirs" in out, out
    assert "restored quality of base-s0 from its MLflow run" in out, out
    shutil.rmtree(new / "results")
    result, out = harness_here(["run", "kept.yaml", "--no-report"], new, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "0 to run" in out and "restored 1 run(s) of kept that MLflow finished" in out, out
    assert "which no longer exists" not in out  # pointed once
    for table in ("dataset", "train", "per_t", "probe", "drift", "drift_hist", "quality"):
        assert len(parquet(new, table)) > 0, table
    assert not (new / "results" / "kept" / "checkpoints").exists()  # nothing trained
    _, run = the_run(new)
    assert run.info.run_id == kept[2].info.run_id
    assert run.info.artifact_uri.startswith((new / "mlartifacts" / "kept").as_uri())
    assert not old.exists()


def test_a_moved_folder_without_its_artifacts_runs_its_keys_again(kept, tmp_path):
    """Moved without results/ and mlartifacts/: MLflow's run is FINISHED but nothing can give
    its tables back. The key is not left "finished" with no tables: it runs again, said, into
    a new MLflow run (the old one deleted, naming it), inside the moved folder."""
    old, new = moved_folder(kept, tmp_path)
    shutil.rmtree(new / "results")
    shutil.rmtree(new / "mlartifacts")
    out, err = harness_process(["run", "kept.yaml", "--no-report"], new).communicate(timeout=600)
    said = " ".join(out.split())
    assert "1 run(s) MLflow finished have neither tables in results/ nor their MLflow artifacts" in said, out + err
    assert "finished base-s0" in said, out + err
    runs = parquet(new, "runs")
    assert runs["status"].tolist() == ["finished"]
    for table in ("dataset", "train", "per_t", "probe", "drift", "drift_hist", "quality"):
        assert len(parquet(new, table)) > 0, table
    client, run = the_run(new)  # the one live run of the key
    assert run.info.status == "FINISHED" and run.info.run_id != kept[2].info.run_id
    assert runs["mlflow_run_id"].tolist() == [run.info.run_id]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == kept[3]
    assert run.info.artifact_uri.startswith((new / "mlartifacts" / "kept").as_uri())
    assert client.get_run(kept[2].info.run_id).data.tags["superseded_by"] == run.info.run_id
    assert not old.exists()


# ---------------------------------------------------------------- disks that refuse


@contextmanager
def read_only_folder(path: Path):
    """A folder no write into succeeds: 0555 for a user; for root, whom permissions do not
    stop, a read-only tmpfs mounted on it (skipped where mounting is not allowed)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]).returncode:
        pytest.skip("root, and no read-only mount: permissions cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_results_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    study = write_study(tmp_path, "readonly")
    results = tmp_path / "results"
    with read_only_folder(results):
        result, out = harness_here(["run", str(study), "--no-report"], tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert "error: cannot write results/readonly: " in out
    assert "Read-only file system" in out or "Permission denied" in out
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert not (tmp_path / "mlflow.db").exists()  # stopped before anything started


def test_a_full_disk_while_recording_is_one_line_naming_the_file(copy_of, monkeypatch):
    """pyarrow's own ENOSPC from the atomic writer of results/ (its files are written in this
    process): exit 2 naming the file."""
    import pyarrow.parquet as pq

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    result, out = harness_here(["run", "kept.yaml", "--no-report"], copy_of, monkeypatch)
    assert result.exit_code == 2, result.output
    assert f"error: no space left on device writing {Path('results') / 'kept'}" in out, out
    assert "Traceback" not in result.output


@pytest.fixture
def one_thread():
    """Engine runs in this process on one thread: tiny models gain nothing from more, and
    lose much when the cores are busy (torch.set_num_threads is process-wide: set back after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_CONFIG = {
    "model": {"preset": "tiny", "base_channels": 16, "time_embed_dim": 32},
    "diffusion": {"T": 10},
    "train": {"steps": 10, "batch_size": 8, "checkpoint_every": 5, "warmup_steps": 1},
    "sample": {"num_samples": 4},
    "eval": {"probe_images": 8, "quality": False, "drift_hist_steps": 2},
}


def test_a_full_disk_is_the_run_s_recorded_reason(tmp_path, monkeypatch, one_thread):
    """torch.save on a full disk says only "unexpected pos"; the run's reason names the disk and
    the checkpoint instead (the file system's free space, read with statvfs, tells)."""
    from ddpm_engine import ExperimentConfig, NullRecorder, training
    from ddpm_engine import files as engine_files
    from harness.runs.lifecycle import RunState, execute

    config = ExperimentConfig.from_dict(TINY_CONFIG)
    real_statvfs = os.statvfs

    def torch_save_on_a_full_disk(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def no_space_left(path):
        stats = real_statvfs(path)
        return os.statvfs_result((*stats[:4], 0, *stats[5:]))  # f_bavail = 0

    monkeypatch.setattr(training.torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(engine_files.os, "statvfs", no_space_left)
    outcome = execute(config, NullRecorder(), device="cpu", checkpoint_dir=tmp_path / "ckpt")
    assert outcome.state is RunState.FAILED
    assert outcome.reason == f"no space left on device writing {tmp_path / 'ckpt' / 'last.pt'}"
    assert not list((tmp_path / "ckpt").iterdir())  # the half-written temp file went with the failure


def test_only_a_full_disk_is_called_full(tmp_path):
    from ddpm_engine.files import DiskFull, atomic_write

    target = tmp_path / "table.parquet"

    def refused(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", tmp)

    def torch_failing(tmp):
        raise RuntimeError("unexpected pos 576 vs 534")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(PermissionError) as refusal:
        atomic_write(target, refused)
    assert not isinstance(refusal.value, DiskFull)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the disk has room: the error is what it was
        atomic_write(target, torch_failing)
    with pytest.raises(DiskFull, match=f"^no space left on device writing {target}$"):
        atomic_write(target, full)
    assert list(tmp_path.iterdir()) == []  # no temp file left by any of them


@contextmanager
def tiny_filesystem(path: Path, size: str):
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_run_that_fills_the_disk_ends_with_its_reason_and_exit_2(kept, tmp_path):
    """A real full disk (a 1 MiB tmpfs as --results; a checkpoint is about 3 MB): the run's
    checkpoint fails, its reason says so in the runs table and in MLflow, exit 2."""
    shutil.copy(kept[0] / "mlflow.db", tmp_path / "mlflow.db")  # a whole store: none to create
    study = write_study(tmp_path, "full", steps=10, ckpt=5)
    results = tmp_path / "small"
    with tiny_filesystem(results, "1m"):
        proc = harness_process(["run", str(study), "--no-report", "--results", str(results)], tmp_path)
        out, err = proc.communicate(timeout=600)
        said = " ".join(err.split())
        assert proc.returncode == 2, out + err
        (key,) = [p.name for p in (results / "full" / "checkpoints").iterdir()]
        reason = f"no space left on device writing {results}/full/checkpoints/{key}/last.pt"
        assert f"error: {reason} (run base-s0)" in said, out + err
        rows = pd.read_parquet(results / "full" / "runs")
    assert "Traceback" not in out + err
    assert rows["status"].tolist() == ["failed"] and rows["error"].tolist() == [reason]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"] == reason


# ---------------------------------------------------------------- Ctrl-C twice


def test_ctrl_c_twice_stops_at_once_without_a_traceback_and_the_run_resumes(kept, tmp_path):
    shutil.copy(kept[0] / "mlflow.db", tmp_path / "mlflow.db")
    # steps of 4,096 images (about a second each here; batches are drawn with replacement): the
    # slot is still in its step when the second Ctrl-C comes, however fast the machine (512 was
    # not always enough: the run had stopped before the second one arrived)
    study = write_study(tmp_path, "twice", steps=4, ckpt=2, batch=4096)
    proc = harness_process(["run", str(study), "--no-report"], tmp_path, start_new_session=True)
    checkpoints = tmp_path / "results" / "twice" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*/last.pt")):
        time.sleep(0.1)
    assert list(checkpoints.glob("*/last.pt")), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    time.sleep(0.2)  # two signals sent at once are one
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    said = " ".join(out.split())
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "ERROR" not in err  # (MLflow's logger said ERROR at an unclean exit)
    assert "Ctrl-C again: stopping now" in said and "stopped: run the same command again to resume" in said
    row = pd.read_parquet(tmp_path / "results" / "twice" / "runs").iloc[0]
    assert row["status"] == "interrupted" and "stopped at once by a second Ctrl-C" in row["error"]
    (checkpoint,) = checkpoints.glob("*/last.pt")
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.pt"]  # no half-written temp file

    again, err = harness_process(["run", str(study), "--no-report"], tmp_path).communicate(timeout=600)
    assert "1 to run" in again and "finished base-s0" in again, again + err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("twice").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_step"] >= 2
    train = pd.read_parquet(tmp_path / "results" / "twice" / "train")
    assert train["step"].tolist() == [4]  # the last step's row (logged every 5 steps and at the last)


# ---------------------------------------------------------------- a checkpoint set aside


def test_a_checkpoint_set_aside_is_said_in_the_run_s_record(kept, tmp_path, monkeypatch, one_thread):
    """The run goes on from scratch; its runs row and its MLflow run keep why."""
    from ddpm_engine import ExperimentConfig
    from harness.runs.lifecycle import RunState, execute
    from harness.store.tracking import RunTracker, ensure_experiment
    from harness.study.plan import Arm, RunSpec

    shutil.copy(kept[0] / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts go to ./mlartifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = ExperimentConfig.from_dict(TINY_CONFIG)
    last = tmp_path / "ckpt" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(
        b"PK\x03\x04" + bytes(1000)
    )  # the head of a zip, cut short (a full disk outside our atomic writes)

    spec = RunSpec("notes", Arm("base", {}, {}), 0, config, "a1b2c3d4e5f6")
    tracker = RunTracker(client, ensure_experiment(client, "notes"), spec, tmp_path / "results", commit="abc")
    tracker.start()
    outcome = execute(config, tracker, device="cpu", checkpoint_dir=last.parent)
    tracker.end(outcome)
    assert outcome.state is RunState.FINISHED and outcome.summary["resumed_from_step"] == 0
    assert (last.parent / "last.pt.corrupt").exists()
    said = f"checkpoint {last} does not load ("
    assert outcome.reason.startswith(said) and outcome.reason.endswith(
        "set aside as last.pt.corrupt, the run starts over"
    )
    row = pd.read_parquet(tmp_path / "results" / "notes" / "runs").iloc[0]
    assert row["status"] == "finished" and row["note"] == outcome.reason and row["error"] == ""
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == outcome.reason


def test_the_study_manifest_is_written_through_a_temp_file_of_its_own(tmp_path):
    # two `harness run` of one study write study.json at once: with one shared temp name the
    # second's rename found it gone ("cannot write results/twice/study.json.tmp"). A folder
    # squatting on that shared name stands in for the other process, deterministically.
    from harness.study.plan import write_manifest

    folder = tmp_path / "twice"
    (folder / "study.json.tmp").mkdir(parents=True)
    path = write_manifest(tmp_path, {"study": "twice", "arms": []})
    assert json.loads(path.read_text()) == {"study": "twice", "arms": []}
    assert sorted(p.name for p in folder.iterdir()) == ["study.json", "study.json.tmp"]
