"""Inputs and surroundings that broke the CLI: each is one line and exit 2 (or the right
behaviour), never a traceback, a hang or a silently different run."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

HEADER = "study: s\nquestion: Does it validate?\n"


def harness(args, cwd, timeout=60, drop_root=False, env=None):
    """The CLI in a subprocess. ``drop_root``: without the capability that lets root write
    into read-only folders, so a read-only folder is one here too."""
    prefix = []
    if drop_root and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder is writable")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(proc, *needles):
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    for needle in needles:
        assert needle in out, out
    return out


# ---------------------------------------------------------------- study files


def test_a_fifo_as_the_study_is_refused_at_once(tmp_path):
    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    proc = harness(["plan", str(fifo), "--no-measure"], tmp_path, timeout=30)
    one_line_error(proc, f"{fifo}: is a FIFO, not a regular file")


def test_a_device_as_the_study_is_refused_at_once(tmp_path):
    proc = harness(["plan", "/dev/zero", "--no-measure"], tmp_path, timeout=30)
    one_line_error(proc, "/dev/zero: is a device, not a regular file")


def test_a_huge_study_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(HEADER + ("# " + "a" * 98 + "\n") * 20_000)  # 2 MB of comments
    started = time.monotonic()
    proc = harness(["plan", str(path), "--no-measure"], tmp_path)
    one_line_error(proc, "larger than 1 MB")
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("text", "option", "key"),
    [
        (HEADER + "seeds: [true]\n", None, "seeds.0"),
        (HEADER + "seeds: {start: true, max: 4}\n", None, "seeds.start"),
        (HEADER + "base:\n  train: {steps: true}\n", None, "base.train.steps"),
        (HEADER + "base:\n  model: {channel_mults: [1, true]}\n", None, "base.model.channel_mults"),
        (HEADER, "train.steps=true", "--set: train.steps"),
        (HEADER, "train.lr=false", "--set: train.lr"),
    ],
)
def test_a_boolean_is_not_a_number(tmp_path, text, option, key):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    args = ["plan", str(path), "--no-measure", "--no-check"] + (["--set", option] if option else [])
    proc = harness(args, tmp_path)
    out = one_line_error(proc, key)
    assert "valid integer" in out or "a boolean is not a number" in out


def test_a_boolean_still_sets_a_boolean_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(HEADER)
    proc = harness(["plan", str(path), "--no-measure", "--no-check", "--set", "sample.use_ema=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_unknown_device_is_refused(tmp_path, command):
    path = tmp_path / "s.yaml"
    path.write_text(HEADER)
    proc = harness([command, str(path), "--device", "tpu"], tmp_path)
    one_line_error(proc, "--device 'tpu': not a device", "cuda:N")
    assert not (tmp_path / "results").exists()


def test_no_work_without_storage_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(HEADER)
    proc = harness(["run", str(path), "--no-work"], tmp_path)
    one_line_error(proc, "--no-work needs --storage")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--launcher", "pbs"], "--launcher 'pbs': not a launcher; use one of local, optuna, slurm, submitit-local"),
        pytest.param(
            ["--launcher", "slurm"],
            "--launcher slurm: no sbatch or srun on this machine (not a SLURM login node)",
            marks=pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a SLURM machine"),
        ),
        (["--launcher", "optuna"], "--launcher optuna needs --storage"),
        (["--launcher", "local", "--storage", "sqlite:///q.db"], "use --launcher optuna"),
    ],
)
def test_a_launcher_without_what_it_needs_is_refused(tmp_path, args, message):
    path = tmp_path / "s.yaml"
    path.write_text(HEADER)
    proc = harness(["run", str(path), *args], tmp_path)
    one_line_error(proc, message)
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- rich markup in names

MARKUP_STUDY = HEADER + 'ablations:\n  a:\n    "lo[/bold]": {train.lr: 0.001}\n    "[red]hi": {train.lr: 0.002}\n'


@pytest.mark.parametrize("command", [["plan", "--no-measure", "--no-check"], ["status"]])
def test_arm_names_with_rich_markup_are_printed_as_written(tmp_path, command):
    """`status` prints the table `run` prints at its end."""
    path = tmp_path / "s.yaml"
    path.write_text(MARKUP_STUDY)
    proc = harness([command[0], str(path), *command[1:]], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lo[/bold]" in proc.stdout and "[red]hi" in proc.stdout


# ---------------------------------------------------------------- report


@pytest.fixture
def judged_study(tmp_path):
    """A finished hand-made study with one hypothesis, and its study file."""
    sys.path.insert(0, str(Path(__file__).parent))
    from handmade import run_key, write_run, write_study

    results = tmp_path / "results"
    hypotheses = {"h": {"metric": "bpd", "expect": "below", "value": 100.0}}
    write_study(results, "s", ["base", "other"], [0, 1], "base", hypotheses=hypotheses)
    for arm in ("base", "other"):
        for seed in (0, 1):
            key = run_key("s", arm, seed)
            write_run(results, "s", arm, seed, quality=pd.DataFrame([{"run_key": key, "bpd": 1.0 + seed}]))
    path = tmp_path / "s.yaml"
    path.write_text(HEADER)
    return tmp_path, path, results


def test_report_on_a_read_only_results_folder_is_built_anyway(judged_study):
    cwd, path, results = judged_study
    modes = {}
    for folder in [results, *results.rglob("*")]:
        if folder.is_dir():
            modes[folder] = folder.stat().st_mode
            folder.chmod(0o555)
    try:
        proc = harness(["report", str(path)], cwd, timeout=120, drop_root=True)
    finally:
        for folder, mode in modes.items():
            folder.chmod(mode)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (cwd / "reports" / "s" / "index.html").read_text()
    assert "hypotheses.parquet was not written" in html
    assert not (results / "s" / "hypotheses.parquet").exists()


def test_report_with_hypotheses_parquet_as_a_folder_is_one_line(judged_study):
    cwd, path, results = judged_study
    (results / "s" / "hypotheses.parquet").mkdir()
    proc = harness(["report", str(path)], cwd, timeout=120)
    one_line_error(proc, "hypotheses.parquet is a folder")


def test_report_with_a_study_json_list_infers_the_design(judged_study):
    cwd, path, results = judged_study
    (results / "s" / "study.json").write_text("[1, 2]")
    proc = harness(["report", str(path)], cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not an object" in (cwd / "reports" / "s" / "index.html").read_text()


def test_report_into_a_read_only_reports_folder_is_one_line(judged_study):
    cwd, path, _ = judged_study
    (cwd / "reports").mkdir(mode=0o555)
    try:
        proc = harness(["report", str(path)], cwd, timeout=120, drop_root=True)
    finally:
        (cwd / "reports").chmod(0o755)
    one_line_error(proc, "cannot write reports/s", "Permission denied")


# ---------------------------------------------------------------- the MLflow store

SMALL = HEADER + "base:\n  train: {steps: 2}\n"


def test_a_tracking_uri_without_a_scheme_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    proc = harness(["run", str(path)], tmp_path, env={"MLFLOW_TRACKING_URI": "garbage"})
    one_line_error(proc, "MLFLOW_TRACKING_URI='garbage' is not a tracking URI")
    assert not (tmp_path / "results" / "s" / "runs").exists()


def test_a_server_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    started = time.monotonic()
    proc = harness(["run", str(path)], tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, timeout=120)
    one_line_error(proc, "the MLflow tracking server http://127.0.0.1:9 did not answer")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "results" / "s" / "runs").exists()


@pytest.fixture
def store(tmp_path):
    """A SQLite file where the harness looks for its store (a whole MLflow store is not
    needed: every failure here comes before MLflow opens it)."""
    import sqlite3
    from contextlib import closing

    path = tmp_path / "mlflow.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
    return path


def test_a_store_in_a_read_only_folder_is_one_line(tmp_path, store):
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    folder = tmp_path / "ro"
    folder.mkdir()
    store.rename(folder / "mlflow.db")
    folder.chmod(0o555)
    try:
        proc = harness(
            ["run", str(path)], tmp_path, drop_root=True, env={"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
        )
    finally:
        folder.chmod(0o755)
    one_line_error(proc, f"the MLflow store {folder}/mlflow.db is in a folder this process cannot write")
    assert not (tmp_path / "results" / "s" / "runs").exists()


def test_a_store_locked_by_another_process_names_it(tmp_path, store):
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"db = sqlite3.connect({str(store)!r}, isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        proc = harness(["run", str(path)], tmp_path, env={"DDPM_ABLATE_STORE_WAIT": "2"}, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    one_line_error(proc, f"the MLflow store {store} is locked by process {holder.pid}", "waited 2 s")
    assert elapsed < 60
    assert not (tmp_path / "results" / "s" / "runs").exists()


# ---------------------------------------------------------------- Ctrl-C while slots start


def test_a_slot_ignores_ctrl_c_from_its_start(tmp_path):
    """A Ctrl-C reaches the whole process group while the slots still import: they must
    ignore it (the parent decides), not die with a KeyboardInterrupt traceback."""
    import signal

    from harness.launch.slots import LocalScheduler
    from harness.study.plan import expand
    from harness.study.spec import load_study

    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    specs = expand(load_study(path))
    scheduler = LocalScheduler(specs, tmp_path / "results", [("cpu", 1)])
    scheduler.start()
    try:
        for proc in scheduler.procs.values():
            os.kill(proc.pid, signal.SIGINT)  # the slot is still importing
        time.sleep(0.5)
    finally:
        scheduler.abort()
    assert [proc.exitcode for proc in scheduler.procs.values()] == [0]
