"""The MLflow store failing while slots train (a lock held elsewhere past the bound, a store
made read-only, a tracking server that dies): one line naming the store and the cause, exit 2,
no traceback; the slots stop at their checkpoints, the finished run's Parquet tables stay, and
the next `harness run` with a working store writes what MLflow lacks from them."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from harness.store.history import LOGGED_ROWS_TAG, parquet_rows
from harness.store.mlflow_store import GuardedClient, StoreFailure
from harness.study.plan import expand
from harness.study.spec import load_study

# `short` ends while `long` trains: the store fails before short's end is recorded in MLflow
STUDY = """\
study: s
question: Does a store failing mid-run stop the runs cleanly?
base:
  model: {preset: tiny, base_channels: 16, time_embed_dim: 32}
  diffusion: {T: 20}
  train: {steps: 100, batch_size: 32, log_every: 10, checkpoint_every: 10, warmup_steps: 2}
  sample: {num_samples: 8}
  eval: {probe_every: 50, probe_images: 16, drift_hist_steps: 5, quality: false}
ablations:
  length:
    short: {train.steps: 100}
    long: {train.steps: 20000}
baseline: {length: short}
seeds: [0]
"""
TABLES = ("dataset", "train", "per_t", "probe", "drift", "drift_hist", "quality")


def harness_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["DDPM_ABLATE_STORE_WAIT"] = "2"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env | extra


def runs_row(cwd: Path, key: str) -> dict | None:
    path = cwd / "results" / "s" / "runs" / f"{key}.parquet"
    try:
        return pd.read_parquet(path).iloc[0].to_dict()
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def wait_until_both_started(cwd: Path, short, long, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Both runs' `runs` rows say running: the parent has made their MLflow runs (tags,
    params) and is recording their events. Read from Parquet: no MLflow call here competes
    with the parent's for the store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("harness run ended early:\n" + proc.stdout.read() + proc.stderr.read())
        rows = [runs_row(cwd, spec.key) for spec in (short, long)]
        if all(row is not None and row["status"] == "running" for row in rows):
            return
        assert rows[0] is None or rows[0]["status"] == "running", f"{short.name} ended before the store failed"
        time.sleep(0.05)
    pytest.fail("the runs did not start in time")


def wait_until_trained(cwd: Path, spec, timeout: float = 600) -> None:
    """The run's checkpoint is at its last step: its slot is past training, and a stop
    request can no longer interrupt it (the engine asks only between training steps)."""
    path = cwd / "results" / "s" / "checkpoints" / spec.train_key / "last.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            path.exists()
            and torch.load(path, map_location="cpu", weights_only=False)["step"] >= spec.config.train.steps
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"{spec.name} did not finish training in time")


@contextmanager
def paused(proc: subprocess.Popen):
    """The `harness run` parent stopped (SIGSTOP) while its slots go on: it records nothing
    until resumed, so what it meets then does not depend on how fast the slots were."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (its own store and artifact folder under ``folder``), answering."""
    folder.mkdir(exist_ok=True)
    env = harness_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env=env,
        stdout=open(folder / "server.log", "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers die with it (killpg)
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LockHolder:
    """Another process in an exclusive transaction on the SQLite store. Taken while the parent
    runs (a parent paused inside a write would hold the lock itself); from then on the parent's
    next MLflow call waits for the lock, so it records nothing more before the pause. The
    holder starts beforehand and locks on a line from the test: taking the lock is then a
    matter of milliseconds, not of a Python start."""

    pause_first = False

    def __init__(self, cwd: Path):
        self.store = cwd / "mlflow.db"
        self.env: dict[str, str] = {}
        self.prefix: list[str] = []
        # it connects only when told: a connection made now would create an empty mlflow.db
        self.holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time\n"
                "sys.stdin.readline()\n"
                f"db = sqlite3.connect({str(self.store)!r}, isolation_level=None)\n"
                "db.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(600)\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def fail(self):
        self.holder.stdin.write("lock\n")
        self.holder.stdin.flush()
        assert self.holder.stdout.readline().strip() == "locked"

    def expected(self) -> str:
        return f"the MLflow store {self.store} is locked by process {self.holder.pid}"

    def heal(self):
        self.holder.kill()
        self.holder.wait()


class ReadOnlyFolder:
    """The store's folder made read-only (SQLite cannot write its journal beside the store).
    As root the harness runs without the capability to write into read-only folders."""

    pause_first = True  # the parent's next write would fail at once

    def __init__(self, cwd: Path):
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder is writable")
        self.folder = cwd / "store"
        self.folder.mkdir()
        self.env = {"MLFLOW_TRACKING_URI": f"sqlite:///{self.folder / 'mlflow.db'}"}
        self.prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []

    def fail(self):
        self.folder.chmod(0o555)

    def expected(self) -> str:
        return f"the MLflow store {self.folder / 'mlflow.db'} failed:"

    def heal(self):
        self.folder.chmod(0o755)


class DyingServer:
    """A tracking server killed while the runs train, then started again on its store."""

    pause_first = True  # a refused connection fails within the 2 s bound

    def __init__(self, cwd: Path):
        self.folder, self.port = cwd / "server", free_port()
        self.server = start_server(self.folder, self.port)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = {"MLFLOW_TRACKING_URI": self.uri}
        self.prefix: list[str] = []

    def fail(self):
        stop_server(self.server)

    def expected(self) -> str:
        return f"the MLflow tracking server {self.uri} stopped answering"

    def heal(self):
        self.server = start_server(self.folder, self.port)


@pytest.mark.slow
@pytest.mark.parametrize("failure", [LockHolder, ReadOnlyFolder, DyingServer], ids=["locked", "read-only", "server"])
def test_a_store_failing_while_slots_train_stops_them_cleanly(tmp_path, failure):
    (tmp_path / "s.yaml").write_text(STUDY)
    short, long = sorted(expand(load_study(tmp_path / "s.yaml")), key=lambda s: s.arm.label != "short")
    store = failure(tmp_path)
    env = harness_env(store.env)
    uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [*store.prefix, sys.executable, "-m", "harness.cli", "run", "s.yaml", "--no-report", "--workers", "2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_both_started(tmp_path, short, long, proc)
        # the store fails while the parent has recorded neither run's end; it meets the failure
        # once short is past training, so that short finishes and long stops at a checkpoint
        if not store.pause_first:
            store.fail()
        with paused(proc):
            if store.pause_first:
                store.fail()
            assert runs_row(tmp_path, short.key)["status"] == "running"
            wait_until_trained(tmp_path, short)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        store.heal()
    out = " ".join((stdout + stderr).split())
    assert proc.returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert stderr.count("error:") == 1, stderr
    # nothing else at error level: MLflow's logging threads once logged each failed batch
    assert not re.search(r"\bERROR\b", stderr), stderr
    assert store.expected() in out, out
    assert "while runs were training: 1 run(s) stopped at their checkpoints" in out, out
    # the finished run's tables are kept; the long one stopped at a checkpoint and resumes
    assert runs_row(tmp_path, short.key)["status"] == "finished"
    for table in TABLES:
        assert (tmp_path / "results" / "s" / table / f"{short.key}.parquet").exists(), table
    assert runs_row(tmp_path, long.key)["status"] == "interrupted"
    assert (tmp_path / "results" / "s" / "checkpoints" / long.train_key / "last.pt").exists()

    # the store works again: MLflow gets the finished run from results/, one point per step
    again = subprocess.run(
        [*store.prefix, sys.executable, "-m", "harness.cli", "run", "s.yaml", "--no-report", "--arm", "short"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert again.returncode == 0, again.stdout + again.stderr
        assert "completed 1 MLflow run(s)" in " ".join(again.stdout.split()), again.stdout
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("s")
        (run,) = client.search_runs([experiment.experiment_id], f"tags.run_key = '{short.key}'")
        assert run.info.status == "FINISHED"
        assert run.data.tags[LOGGED_ROWS_TAG] == parquet_rows(tmp_path / "results", short)
        train = pd.read_parquet(tmp_path / "results" / "s" / "train" / f"{short.key}.parquet")
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == sorted(train["step"])
    finally:
        if isinstance(store, DyingServer):
            stop_server(store.server)


@pytest.mark.slow
def test_a_lock_met_by_training_metrics_alone_stops_the_run(tmp_path):
    """A run in the middle of its training gives the parent nothing to record but metric
    points: the lock must be met by those writes. Logged through MLflow's asynchronous
    logger, each batch failed in MLflow's threads (an error line each) and nothing stopped
    the run before its 20,000 steps were done."""
    (tmp_path / "s.yaml").write_text(STUDY)
    long = next(s for s in expand(load_study(tmp_path / "s.yaml")) if s.arm.label == "long")
    store = LockHolder(tmp_path)
    command = [sys.executable, "-m", "harness.cli", "run", "s.yaml", "--no-report", "--arm", "long", "--workers", "1"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=harness_env({}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while (runs_row(tmp_path, long.key) or {}).get("status") != "running":
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run did not start:\n" + proc.stdout.read() + proc.stderr.read())
            time.sleep(0.05)
        store.fail()
        # MLflow's own wait for the lock (20 s) and the 2 s bound, with room for a loaded machine
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        store.heal()
    assert proc.returncode == 2, stdout + stderr
    assert stderr.count("error:") == 1 and "Traceback" not in stdout + stderr, stderr
    assert not re.search(r"\bERROR\b", stderr), stderr
    out = " ".join((stdout + stderr).split())
    assert store.expected() in out, out
    assert "1 run(s) stopped at their checkpoints" in out and "0 finished run(s)" in out, out
    assert runs_row(tmp_path, long.key)["status"] == "interrupted"
    assert (tmp_path / "results" / "s" / "checkpoints" / long.train_key / "last.pt").exists()


def test_a_server_that_stops_answering_is_one_store_failure_naming_it(monkeypatch):
    """The guard around the parent's MLflow calls, against a real client whose server is gone:
    a refused connection is tried again within the bound, then one line naming the server;
    every later call fails at once with the same failure (the store is not waited for again)."""
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = GuardedClient(MlflowClient(tracking_uri=uri), uri, wait=1.0)
    with pytest.raises(StoreFailure) as first:
        client.search_experiments(max_results=1)
    message = str(first.value)
    assert message.startswith(f"the MLflow tracking server {uri} stopped answering (")
    assert "Connection refused" in message and "\n" not in message
    with pytest.raises(StoreFailure) as later:
        client.get_experiment_by_name("s")
    assert later.value is first.value
    assert client.tracking_uri == uri  # attributes pass through


def test_a_lock_met_in_the_middle_of_a_write_is_named_as_the_lock(tmp_path):
    """Another process holding the write lock (readers still read): MLflow reads the run, then
    SQLAlchemy's autoflush meets the lock, and its message opens with a remark about the
    autoflush, the lock on a later line. The failure still names the lock and its holder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain = MlflowClient(tracking_uri=uri)
    run_id = plain.create_run(plain.create_experiment("s")).info.run_id
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, time\n"
            f"db = sqlite3.connect({str(tmp_path / 'mlflow.db')!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        client = GuardedClient(MlflowClient(tracking_uri=uri), uri, wait=1.0)
        with pytest.raises(StoreFailure) as failure:
            client.log_batch(run_id, metrics=[Metric("loss", 0.5, 0, 1)])  # MLflow waits 20 s for the lock
    finally:
        holder.kill()
        holder.wait()
    message = str(failure.value)
    assert message.startswith(f"the MLflow store {tmp_path / 'mlflow.db'} is locked by process {holder.pid} ("), message
    assert "autoflush" in str(failure.value.__cause__)  # the case this is about
