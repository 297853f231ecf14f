"""Scale-out end to end: a throwaway PostgreSQL (Optuna storage + MLflow backend), a real
`mlflow server`, and `harness worker` processes draining a study.

Skips with a reason when the PostgreSQL server binaries are missing, unless
DDPM_ABLATE_REQUIRE_SERVERS=1 (CI), where a missing binary fails the tests.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.postgres

REQUIRE = os.environ.get("DDPM_ABLATE_REQUIRE_SERVERS") == "1"
HEARTBEAT, GRACE = 1, 4  # seconds: small so a killed worker's run is retried quickly

STUDY = """\
study: {name}
question: Do workers on many machines drain a study?
base:
  model: {{preset: tiny, base_channels: 16, time_embed_dim: 32}}
  diffusion: {{T: 20}}
  train: {{steps: {steps}, batch_size: 32, log_every: 5, checkpoint_every: {ckpt}, warmup_steps: 2}}
  sample: {{num_samples: 16}}
  eval: {{probe_every: {probe}, probe_images: 32, drift_hist_steps: 5}}
ablations:
  lr:
    base: {{}}
    lr_low: {{train.lr: 0.0001}}
    lr_high: {{train.lr: 0.003}}
seeds: {seeds}
"""


def write_study(folder: Path, name: str, steps: int = 20, ckpt: int = 10, probe: int = 10, seeds=(0, 1)) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, steps=steps, ckpt=ckpt, probe=probe, seeds=list(seeds)))
    return path


def write_adaptive_study(folder: Path, name: str) -> Path:
    """Arms base and lr_low, seeds {start: 2, max: 3}, one hypothesis that two seeds cannot
    decide (the first look's boundary): base and lr_low get a third seed in a second round."""
    path = folder / f"{name}.yaml"
    path.write_text(
        STUDY.format(name=name, steps=20, ckpt=10, probe=10, seeds=[0])
        .replace("    lr_high: {train.lr: 0.003}\n", "")
        .replace("seeds: [0]\n", "seeds: {start: 2, max: 3}\n")
        + "hypotheses:\n  h:\n    metric: fd\n    arm: lr_low\n    versus: baseline\n    expect: above\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} (DDPM_ABLATE_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


def pg_bin() -> Path | None:
    """Debian's PostgreSQL binaries (or DDPM_ABLATE_PG_BIN, a folder holding initdb)."""
    if os.environ.get("DDPM_ABLATE_PG_BIN"):
        folder = Path(os.environ["DDPM_ABLATE_PG_BIN"])
        return folder if (folder / "initdb").exists() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def as_postgres(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """(optuna URL, MLflow tracking URI) of a throwaway PostgreSQL and an `mlflow server`."""
    bindir = pg_bin()
    if bindir is None:
        missing(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb or $DDPM_ABLATE_PG_BIN): "
            "apt-get install postgresql"
        )
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="ddpm-pg-"))  # /tmp: traversable by the postgres user
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = lambda args: subprocess.run(as_postgres(args), check=True, capture_output=True, text=True)  # noqa: E731
    mlflow_proc = None
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "start",
            ]
        )
        admin = f"postgresql://postgres@127.0.0.1:{port}"
        conn = psycopg2.connect(f"{admin}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE optuna")
            cur.execute("CREATE DATABASE mlflow")
        conn.close()

        mport = free_port()
        log = open(root / "mlflow.log", "w")
        mlflow_proc = subprocess.Popen(
            # an explicit driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"{admin.replace('postgresql://', 'postgresql+psycopg2://')}/mlflow",
                "--artifacts-destination",
                str(tmp_path_factory.mktemp("artifacts")),
                "--host",
                "127.0.0.1",
                "--port",
                str(mport),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        uri = f"http://127.0.0.1:{mport}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if mlflow_proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start:\n" + (root / "mlflow.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"{admin}/optuna", uri
    finally:
        if mlflow_proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(mlflow_proc.pid, sig)
                    mlflow_proc.wait(timeout=3)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if (data / "postmaster.pid").exists():
            subprocess.run(
                as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


def env_for(cwd: Path, mlflow_uri: str) -> dict:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=mlflow_uri,
        DDPM_ABLATE_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        DDPM_ABLATE_GRACE_PERIOD=str(GRACE),
    )
    return env


def harness(args, cwd: Path, mlflow_uri: str, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env=env_for(cwd, mlflow_uri),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_worker(study: Path, url: str, cwd: Path, mlflow_uri: str, name: str):
    log = open(cwd / f"{name}.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "worker",
            str(study),
            "--storage",
            url,
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        cwd=cwd,
        env=env_for(cwd, mlflow_uri),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_all(procs, timeout: float) -> None:
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("workers did not finish in time")


def optuna_trials(url: str, name: str):
    import optuna

    from harness.launch.trial_queue import db_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=db_url(url)).get_trials(deepcopy=False)


def mlflow_runs(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id])


def assert_each_key_finished_once(url: str, mlflow_uri: str, name: str, keys: set[str]):
    from optuna.trial import TrialState

    trials = optuna_trials(url, name)
    complete = [t.user_attrs["run_key"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(keys), "exactly one COMPLETE trial per run key"
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    _, runs = mlflow_runs(mlflow_uri, name)
    finished = [r.data.tags["run_key"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(keys), "exactly one FINISHED MLflow run per run key"
    assert len(runs) == len(keys), "one MLflow run per key, retries included"
    return trials, runs


def planned_keys(study: Path) -> dict[str, str]:
    from harness.study.plan import expand
    from harness.study.spec import load_study

    return {s.key: s.name for s in expand(load_study(study))}


def train_keys(study: Path) -> dict[str, str]:
    """run key -> train key: checkpoints live under the train key (harness.runs.checkpoints)."""
    from harness.study.plan import expand
    from harness.study.spec import load_study

    return {s.key: s.train_key for s in expand(load_study(study))}


def test_two_workers_drain_a_study_and_a_fresh_machine_reports_it(servers, tmp_path):
    url, mlflow_uri = servers
    head, node = tmp_path / "head", tmp_path / "node"
    head.mkdir(), node.mkdir()
    study = write_study(head, "drain")
    keys = planned_keys(study)
    assert len(keys) == 6

    first = harness(["run", str(study), "--storage", url, "--no-work"], head, mlflow_uri)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "enqueued 6" in first.stdout
    again = harness(["run", str(study), "--storage", url, "--no-work"], head, mlflow_uri)
    assert again.returncode == 0 and "enqueued 0" in again.stdout, again.stdout + again.stderr
    trials = optuna_trials(url, "drain")
    assert sorted(t.user_attrs["run_key"] for t in trials) == sorted(keys) and {t.state.name for t in trials} == {
        "WAITING"
    }

    workers = [start_worker(study, url, cwd, mlflow_uri, "worker") for cwd in (head, node)]
    wait_all(workers, 180)
    logs = [(cwd / "worker.log").read_text() for cwd in (head, node)]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)
    trials, runs = assert_each_key_finished_once(url, mlflow_uri, "drain", set(keys))
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers took work"

    # an empty queue: a new worker claims nothing and never lets the sampler invent a trial
    idle = harness(["worker", "drain", "--storage", url, "--no-wait"], node, mlflow_uri)
    assert idle.returncode == 0, idle.stdout + idle.stderr
    assert len(optuna_trials(url, "drain")) == 6

    status = harness(["status", str(study), "--storage", url], node, mlflow_uri)
    assert status.returncode == 0, status.stderr
    assert "6 runs: 6 finished, 0 running, 0 pending, 0 failed" in " ".join(status.stdout.split())

    # a machine that ran nothing builds the report from what the workers logged to MLflow
    fresh = tmp_path / "laptop"
    fresh.mkdir()
    shutil.copy(study, fresh / study.name)
    report = harness(["report", study.name, "--from-mlflow"], fresh, mlflow_uri)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "pulled 6 MLflow run(s)" in report.stdout
    html = (fresh / "reports" / "drain" / "index.html").read_text()
    for arm in ("base", "lr_low", "lr_high"):
        assert arm in html
    import pyarrow.dataset as ds

    rows = ds.dataset(str(fresh / "results" / "drain" / "runs"), format="parquet").to_table().to_pandas()
    assert sorted(rows["run_key"]) == sorted(keys) and set(rows["status"]) == {"finished"}
    per_t = ds.dataset(str(fresh / "results" / "drain" / "per_t"), format="parquet").to_table().to_pandas()
    assert set(per_t["run_key"]) == set(keys)
    assert "finished" in html and "not started" not in html

    # a table cut short on that machine is put back from the run's MLflow artifact, not counted as here
    victim = next(iter(keys))
    quality = fresh / "results" / "drain" / "quality" / f"{victim}.parquet"
    quality.write_bytes(quality.read_bytes()[:40])
    again = harness(["report", study.name, "--from-mlflow"], fresh, mlflow_uri)
    assert again.returncode == 0, again.stdout + again.stderr
    said = " ".join(again.stdout.split())
    assert f"{victim}: quality missing or unreadable here: restored from MLflow run" in said, said
    assert "(1 downloaded, 5 already here)" in said, said
    import pyarrow.parquet as pq

    assert pq.read_table(quality).num_rows > 0


def test_a_killed_workers_run_is_retried_by_the_other(servers, tmp_path):
    url, mlflow_uri = servers
    study = write_study(tmp_path, "killed", steps=200, ckpt=20, probe=100, seeds=(0,))
    keys = planned_keys(study)
    enqueue = harness(["run", str(study), "--storage", url, "--no-work"], tmp_path, mlflow_uri)
    assert enqueue.returncode == 0, enqueue.stdout + enqueue.stderr

    victim = start_worker(study, url, tmp_path, mlflow_uri, "victim")
    survivor = start_worker(study, url, tmp_path, mlflow_uri, "survivor")
    checkpoints = tmp_path / "results" / "killed" / "checkpoints"
    deadline, victim_key = time.time() + 120, None
    while time.time() < deadline and victim_key is None:
        for trial in optuna_trials(url, "killed"):
            key = trial.user_attrs.get("run_key")
            if (
                trial.state.name == "RUNNING"
                and trial.user_attrs.get("pid") == victim.pid
                and (checkpoints / train_keys(study)[key] / "last.pt").exists()
            ):
                victim_key = key
        time.sleep(0.3)
    assert victim_key, "the victim never claimed a trial and checkpointed:\n" + (tmp_path / "victim.log").read_text()
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    wait_all([survivor], 200)
    log = (tmp_path / "survivor.log").read_text()
    assert survivor.returncode == 0, log
    trials, runs = assert_each_key_finished_once(url, mlflow_uri, "killed", set(keys))
    of_victim = sorted((t for t in trials if t.user_attrs["run_key"] == victim_key), key=lambda t: t.number)
    assert [t.state.name for t in of_victim] == ["FAIL", "COMPLETE"], "stale trial failed, its retry completed"
    retry = of_victim[-1]
    assert retry.user_attrs["pid"] == survivor.pid and retry.system_attrs["retry_history"] == [of_victim[0].number]
    run = next(r for r in runs if r.data.tags["run_key"] == victim_key)
    assert run.data.tags.get("resumed") == "true"
    assert run.data.metrics["resumed_from_step"] >= 20, "the retry resumed from the shared checkpoint"
    # one point per logged step in MLflow: neither the points the victim logged past its
    # checkpoint (trained again by the retry) twice, nor the ones its kill lost, missing
    client, _ = mlflow_runs(mlflow_uri, "killed")
    train = pq.read_table(tmp_path / "results" / "killed" / "train" / f"{victim_key}.parquet").column("step")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == sorted(train.to_pylist())


def test_two_runs_logging_one_split_at_once_both_get_it(servers, tmp_path):
    """Two queue workers starting on a fresh experiment raced MLflow's look-up-then-insert of
    their split: the loser's run failed on PostgreSQL's "dataset_pk" (seen 1 in 4 runs of the
    test above). The race is made to happen here: the other worker's insert lands between the
    loser's look-up and its insert."""
    import psycopg2
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy import event

    from harness.store.tracking import dataset_input, log_dataset_input

    url, _ = servers
    admin = url.rsplit("/", 1)[0]
    conn = psycopg2.connect(f"{admin}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE races")
    conn.close()
    db = admin.replace("postgresql://", "postgresql+psycopg2://") + "/races"
    client = MlflowClient(tracking_uri=db)
    experiment = client.create_experiment("races", artifact_location=(tmp_path / "artifacts").as_uri())

    def split(digest: str) -> pd.DataFrame:
        row = dict(name="digits", digest=digest, source="sklearn.datasets.load_digits", train_images=10)
        return pd.DataFrame([row | dict(heldout_images=2, channels=1, image_size=8, levels=17)])

    def raced(frame: pd.DataFrame, log) -> tuple[str, str]:
        loser, winner = (client.create_run(experiment).info.run_id for _ in range(2))
        engine, won = client._tracking_client.store.engine, []

        def the_other_worker_inserts_first(conn, cursor, statement, *args):
            if not won and statement.lstrip().upper().startswith("SELECT") and "FROM datasets" in statement:
                won.append(True)
                MlflowClient(tracking_uri=db).log_inputs(winner, datasets=[dataset_input(frame)])

        event.listen(engine, "after_cursor_execute", the_other_worker_inserts_first)
        try:
            log(loser, frame)
        finally:
            event.remove(engine, "after_cursor_execute", the_other_worker_inserts_first)
        assert won, "the race was not staged"
        return loser, winner

    # the premise: MLflow's own call loses the race
    with pytest.raises(MlflowException, match="dataset_pk"):
        raced(split("d1"), lambda run, frame: client.log_inputs(run, datasets=[dataset_input(frame)]))
    loser, winner = raced(split("d2"), lambda run, frame: log_dataset_input(client, run, frame))
    for run in (loser, winner):
        inputs = client.get_run(run).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("digits", "d2")]


def test_adaptive_seeds_run_in_rounds_on_the_queue(servers, tmp_path):
    """An adaptive study on the queue: the launcher's process works on each round, looks at
    the hypotheses and enqueues the next seeds; a `harness worker` that finds the queue empty
    between rounds waits for the coordinator's next round instead of exiting."""
    url, mlflow_uri = servers
    study = write_adaptive_study(tmp_path, "rounds")
    keys = {name: key for key, name in planned_keys(study).items()}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(study), "--storage", url],
        cwd=tmp_path,
        env=env_for(tmp_path, mlflow_uri),
        stdout=open(tmp_path / "coordinator.log", "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not any(t.state.name == "COMPLETE" for t in optuna_trials_or_none(url, "rounds")):
        assert time.time() < deadline and coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()
        time.sleep(0.5)
    helper = start_worker(study, url, tmp_path, mlflow_uri, "helper")
    wait_all([coordinator, helper], 400)
    said = " ".join((tmp_path / "coordinator.log").read_text().split())
    assert coordinator.returncode == 0, said
    assert "adaptive seeds: 1 hypothesis row(s) undecided; base -> 3 seeds, lr_low -> 3 seeds" in said
    assert "adaptive seeds: enqueued 2 run(s) for the next round" in said
    assert "adaptive seeds: stopped (" in said and "seeds per arm: base 3, lr_low 3" in said
    helped = " ".join((tmp_path / "helper.log").read_text().split())
    assert helper.returncode == 0, helped
    # the helper outlived the gap between the rounds (it says so when it polls inside the gap;
    # the submitit test's jobs always do) and ran a run of the second
    second = [keys["base-s2"], keys["lr_low-s2"]]
    assert any(f"finished {key}" in helped for key in second), helped
    assert_each_key_finished_once(url, mlflow_uri, "rounds", set(keys.values()))
    assert (tmp_path / "reports" / "rounds" / "index.html").exists()
    judged = pq.read_table(tmp_path / "results" / "rounds" / "hypotheses.parquet").to_pandas()
    assert judged["n"].tolist() == [3]

    # the same command again resumes at the round reached: nothing enqueued, no second look
    # asking for the third seeds again, every key in the storage's design
    again = harness(["run", str(study), "--storage", url], tmp_path, mlflow_uri)
    said = " ".join(again.stdout.split())
    assert again.returncode == 0, said
    assert "enqueued 0" in said and "hypothesis row(s) undecided" not in said, said
    status = harness(["status", str(study), "--storage", url], tmp_path, mlflow_uri)
    assert all(key in status.stdout for key in keys.values()), status.stdout


def optuna_trials_or_none(url: str, name: str) -> list:
    try:
        return optuna_trials(url, name)
    except KeyError:  # not created yet
        return []


def test_run_with_storage_works_and_records_a_failing_run(servers, tmp_path):
    """`harness run --storage` (without --no-work) drains the queue itself; a Python
    exception marks the trial FAIL and the MLflow run FAILED with its reason."""
    url, mlflow_uri = servers
    study = tmp_path / "flaky.yaml"
    study.write_text(
        STUDY.format(name="flaky", steps=20, ckpt=10, probe=10, seeds=[0]).split("ablations:")[0]
        + "ablations:\n  lr:\n    base: {}\nseeds: [0]\n"
    )
    (key,) = planned_keys(study)
    blocker = tmp_path / "results" / "flaky" / "checkpoints" / train_keys(study)[key]
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder: saving the checkpoint raises")

    first = harness(["run", str(study), "--storage", url], tmp_path, mlflow_uri)
    assert first.returncode == 1, first.stdout + first.stderr
    (trial,) = optuna_trials(url, "flaky")
    assert trial.state.name == "FAIL" and "Error" in trial.user_attrs["error"]
    _, (run,) = mlflow_runs(mlflow_uri, "flaky")
    assert run.info.status == "FAILED" and run.data.tags["error"] == trial.user_attrs["error"]
    assert (tmp_path / "reports" / "flaky" / "index.html").exists()

    status = harness(["status", str(study), "--storage", url], tmp_path, mlflow_uri)
    assert "failed" in status.stdout and "1 failed" in " ".join(status.stdout.split())
    again = harness(["run", str(study), "--storage", url, "--no-work"], tmp_path, mlflow_uri)
    assert "enqueued 0" in again.stdout and "1 failed" in again.stdout, again.stdout
    retry = harness(["run", str(study), "--storage", url, "--no-work", "--retry-failed"], tmp_path, mlflow_uri)
    assert "enqueued 1" in retry.stdout, retry.stdout
    assert [t.state.name for t in optuna_trials(url, "flaky")] == ["FAIL", "WAITING"]


# ---------------------------------------------------------------------------- SLURM through submitit


def test_submitit_local_launcher_runs_an_adaptive_study_end_to_end(servers, tmp_path):
    """`harness run --launcher submitit-local`: the same job array SLURM would get, as local
    processes; it enqueues, follows the jobs, and reports. With adaptive seeds the launcher
    enqueues each round while the jobs' workers wait for it between rounds."""
    url, mlflow_uri = servers
    study = write_adaptive_study(tmp_path, "arrayed_cli")
    keys = planned_keys(study)
    out = harness(
        ["run", str(study), "--launcher", "submitit-local", "--workers", "2", "--storage", url, "--device", "cpu"]
        + ["--cpus-per-task", "1"],
        tmp_path,
        mlflow_uri,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert "enqueued 4" in text and "submitted 2 worker job(s) to local processes (submitit)" in text
    assert "adaptive seeds: enqueued 2 run(s) for the next round" in text  # two seeds decide nothing
    assert "seeds per arm: base 3, lr_low 3" in text
    assert (tmp_path / "reports" / "arrayed_cli" / "index.html").exists()
    assert_each_key_finished_once(url, mlflow_uri, "arrayed_cli", set(keys))
    # the jobs' logs are where the launcher said, and a job waited for the second round
    logs = [log.read_text() for log in (tmp_path / "results" / "arrayed_cli" / "submitit").rglob("*_log.out")]
    assert len(logs) == 2 and all("worker " in log for log in logs)
    assert any("waiting for the coordinator's next round" in " ".join(log.split()) for log in logs)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_job_signalled_before_its_time_limit_checkpoints_requeues_and_every_key_finishes_once(
    servers, tmp_path, monkeypatch
):
    """SLURM sends USR2 to a job's task before its time limit: the job stops its worker (which
    checkpoints the run and puts it back in the queue) and submitit requeues the job, whose new
    worker resumes the run from its checkpoint."""
    from optuna.trial import TrialState

    from harness.launch.base import LaunchOptions
    from harness.launch.submitit_launcher import SlurmOptions, SubmititLauncher
    from harness.runs.checkpoints import CHECKPOINT, checkpoint_dir
    from harness.study.plan import expand
    from harness.study.spec import load_study

    url, mlflow_uri = servers
    monkeypatch.chdir(tmp_path)
    for name, value in env_for(tmp_path, mlflow_uri).items():
        monkeypatch.setenv(name, value)
    path = write_study(tmp_path, "requeued", steps=400, ckpt=20, probe=200, seeds=(0,))
    study = load_study(path)
    specs = expand(study)
    results = tmp_path / "results"
    launcher = SubmititLauncher(
        LaunchOptions(results, reports=None, device="cpu", workers=2),
        "local",
        storage=url,
        slurm=SlurmOptions(cpus_per_task=1),
    )
    q = launcher.open_queue(study, specs)
    jobs = launcher.submit(study.study, 2)
    controllers = {job._process.pid: job for job in jobs}
    by_key = {s.key: s for s in specs}

    # a running trial whose training has written a checkpoint: signal its job's task
    deadline, target = time.time() + 240, None
    while target is None and time.time() < deadline:
        for trial in q.queue.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            spec = by_key[trial.user_attrs["run_key"]]
            if "pid" in trial.user_attrs and (checkpoint_dir(results, spec) / CHECKPOINT).exists():
                task = _parent(int(trial.user_attrs["pid"]))
                if _parent(task) in controllers:
                    target = (trial, task, controllers[_parent(task)])
                    break
        time.sleep(0.1)
    assert target is not None, "no run reached a checkpoint while its worker ran"
    trial, task, job = target
    os.kill(task, signal.SIGUSR2)  # what SLURM's --signal=USR2@120 does

    codes = launcher.follow(jobs, q, every=1.0)
    assert codes == [0, 0], [j.stderr() for j in jobs]
    key = trial.user_attrs["run_key"]
    log = job.stdout()
    assert f"interrupted {key} at step" in " ".join(log.split()), log
    assert log.count(f"study {study.study}, heartbeat") == 2, "the requeued job started a second worker:\n" + log
    step = int(" ".join(log.split()).split(f"interrupted {key} at step ")[1].split(":")[0])
    assert step >= 20, "the run was stopped after its first checkpoint"
    assert_each_key_finished_once(url, mlflow_uri, "requeued", set(by_key))
    attempts = [t for t in optuna_trials(url, "requeued") if t.user_attrs.get("run_key") == key]
    assert [t.state.name for t in attempts] == ["FAIL", "COMPLETE"], "interrupted once, then finished on requeue"
