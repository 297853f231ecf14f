"""Launchers without a cluster: the SLURM launcher's dry run prints the sbatch file submitit
would submit, its options are checked before anything is enqueued, and its time limits are
read as sbatch reads them. The submitit path that runs jobs is tested end to end in
test_distributed.py (it needs the PostgreSQL queue)."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.launch.submitit_launcher import time_minutes

STUDY = """\
study: arrayed
question: Does the dry run show the array?
base:
  model: {preset: tiny, base_channels: 16, time_embed_dim: 32}
  diffusion: {T: 20}
  train: {steps: 20, batch_size: 32}
ablations:
  lr:
    base: {}
    lr_high: {train.lr: 0.003}
seeds: [0, 1]
"""


def harness(args, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "text, minutes",
    [("240", 240), ("30:00", 30), ("30:01", 31), ("4:00:00", 240), ("1-12", 2160), ("1-12:30", 2190), ("0:0:30", 1)],
)
def test_time_limits_are_read_as_sbatch_reads_them(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0", "abc", "1:2:3:4", "-5", "1-x"])
def test_impossible_time_limits_are_refused(text):
    with pytest.raises(ValueError, match="--time"):
        time_minutes(text)


def test_slurm_dry_run_prints_the_array_it_would_submit_and_submits_nothing(tmp_path):
    (tmp_path / "s.yaml").write_text(STUDY)
    out = harness(
        ["run", "s.yaml", "--launcher", "slurm", "--workers", "3", "--partition", "gpu", "--gpus-per-task", "1"]
        + ["--time", "2:00:00", "--dry-run"],
        tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for expected in (
        "#SBATCH --array=0-2%3",  # one array of 3 queue workers
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --time=120",
        "#SBATCH --signal=USR2@120",  # the pre-timeout signal the jobs checkpoint and requeue on
        "#SBATCH --job-name=harness-arrayed",
    ):
        assert expected in lines, out.stdout
    worker = next(line for line in lines if "harness.cli worker arrayed" in line)
    assert "--storage sqlite:///" in worker and str(tmp_path / "results" / "optuna-queue.db") in worker
    assert not (tmp_path / "results").exists(), "a dry run enqueues and writes nothing"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--launcher", "pbs"], "--launcher 'pbs': not a launcher; use one of local, optuna, slurm, submitit-local"),
        (["--dry-run"], "--dry-run prints the sbatch file of --launcher slurm"),
        (["--launcher", "slurm", "--time", "soon", "--dry-run"], "--time must be"),
        (["--launcher", "slurm", "--arm", "base", "--dry-run"], "--arm and --rerun are for local runs"),
        (["--launcher", "optuna"], "--launcher optuna needs --storage"),
        (["--partition", "gpu"], "--partition: for --launcher slurm or submitit-local, not local"),
        (["--launcher", "slurm", "--storage", "sqlite:///q.db", "--no-work"], "--no-work is for --launcher optuna"),
        (["--launcher", "submitit-local", "--dry-run"], "--dry-run prints the sbatch file of --launcher slurm"),
    ],
)
def test_bad_launcher_options_are_one_line_errors(tmp_path, args, needle):
    (tmp_path / "s.yaml").write_text(STUDY)
    out = harness(["run", "s.yaml", *args], tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert needle in " ".join(out.stderr.split()), out.stderr


def test_a_job_killed_outright_stops_its_worker_instead_of_leaving_it_training(tmp_path):
    """The worker runs in its own session (so SLURM's signal to the job's process group does
    not hit it mid-step); if the job is killed outright, the worker must still be told to stop
    (SIGTERM: it checkpoints and re-queues its run), not train on as an orphan."""
    import signal
    import time

    marker, ready = tmp_path / "stopped", tmp_path / "ready"
    worker = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('term'), sys.exit(0)))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(120)\n"
    )
    job = (
        "import sys\n"
        "from harness.launch.submitit_launcher import QueueWorkerJob\n"
        f"QueueWorkerJob([sys.executable, '-c', {worker!r}], {{}}, {str(tmp_path)!r})()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", job])
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:  # the worker is up, its handler set
        time.sleep(0.1)
    assert ready.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the worker outlived its job without being told to stop"


def test_a_round_lease_holds_while_its_coordinator_lives_and_lapses_after(tmp_path):
    """Workers wait between an adaptive study's rounds while the coordinator's lease holds; a
    coordinator killed outright never releases it, so it must lapse by itself."""
    import time

    import optuna

    from harness.launch.queue_rounds import LEASE_ATTR, RoundLease, rounds_open

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'queue.db'}")
    queue = optuna.create_study(storage=storage, study_name="s")
    study_id = storage.get_study_id_from_name("s")
    assert not rounds_open(storage, study_id)
    with RoundLease(queue, every=0.05, lasts=0.4):
        time.sleep(0.8)  # twice as long as the lease lasts: refreshed meanwhile
        assert rounds_open(storage, study_id)
    assert not rounds_open(storage, study_id)  # released at the end
    queue.set_user_attr(LEASE_ATTR, time.time() + 0.3)  # what a killed coordinator leaves
    assert rounds_open(storage, study_id)
    time.sleep(0.4)
    assert not rounds_open(storage, study_id)
