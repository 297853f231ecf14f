"""The `harness` command line: each command parses its arguments and calls one function of
harness.commands; `run` first picks the launcher (harness.launch) that runs the study."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

from . import commands
from .launch.base import Launcher, LaunchOptions
from .terminal import console, fail_input

# console: the one console of every command, which tests narrow through this module
__all__ = ["app", "console"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Run declarative ablation studies of DDPMs and turn them into evidence.\n\n"
    "Example: `harness run studies/timestep_ablation.yaml`",
)

STUDY_ARG = typer.Argument(..., help="A study YAML file, e.g. studies/timestep_ablation.yaml.", show_default=False)
SET_OPT = typer.Option(None, "--set", help="Override the base config: `--set train.steps=500` (repeatable).")
RESULTS_OPT = typer.Option(Path("results"), "--results", help="Folder of Parquet tables and checkpoints.")
REPORTS_OPT = typer.Option(Path("reports"), "--reports", help="Folder of HTML reports.")
STORAGE_OPT = typer.Option(
    None,
    "--storage",
    help="Optuna storage shared by workers on many machines, e.g. `postgresql://user@db-host/optuna`.",
)


def check_device(device: str) -> None:
    """Exit 2 for a device torch would not be asked for: an unknown one was silently run on
    the CPU (`auto`'s choice) by the slots, which only look for "cuda"."""
    # torch builds MPS only on macOS; asking for it elsewhere fails in every slot after the start
    known = "auto, cpu, cuda, cuda:N" + (", mps" if sys.platform == "darwin" else "")
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?" + ("|mps" if sys.platform == "darwin" else ""), device) is None:
        fail_input(ValueError(f"--device {device!r}: not a device; use one of {known}"))


LAUNCHERS = ("local", "optuna", "slurm", "submitit-local")


def pick_launcher(
    name: str, options: LaunchOptions, *, storage: str | None, arms: list[str] | None, work: bool, slurm: dict
) -> Launcher:
    """The launcher ``name`` with the options of `harness run` that it takes; bad input (a name
    it does not know, --storage without the queue, an option of another launcher) exits 2."""
    given = [f"--{key.replace('_', '-')}" for key, value in slurm.items() if value not in (None, False)]
    if slurm["dry_run"] and name != "slurm":
        fail_input(ValueError("--dry-run prints the sbatch file of --launcher slurm"))
    if name in ("slurm", "submitit-local"):
        from .launch.submitit_launcher import SlurmOptions, SubmititLauncher, time_minutes

        if not work:
            fail_input(ValueError(f"--no-work is for --launcher optuna; --launcher {name} submits the workers"))

        try:
            minutes = time_minutes(slurm["time"] or "4:00:00")
        except ValueError as error:
            fail_input(error)
        asked = {k: slurm[k] for k in ("partition", "cpus_per_task", "gpus_per_task", "mem_gb") if slurm[k] is not None}
        cluster = "slurm" if name == "slurm" else "local"
        return SubmititLauncher(
            options,
            cluster,
            storage=storage,
            slurm=SlurmOptions(time_min=minutes, **asked),
            wait=slurm["wait"] is not False,
            dry_run=slurm["dry_run"],
        )
    if given:
        fail_input(ValueError(f"{', '.join(given)}: for --launcher slurm or submitit-local, not {name}"))
    if name == "local":
        if storage:
            fail_input(ValueError("--storage enqueues the runs in an Optuna storage: use --launcher optuna"))
        from .launch.local import LocalLauncher

        return LocalLauncher(options, arms=arms)
    if name == "optuna":
        if not storage:
            fail_input(ValueError("--launcher optuna needs --storage: the Optuna storage URL the runs are enqueued in"))
        from .launch.optuna_queue import OptunaQueueLauncher

        return OptunaQueueLauncher(options, storage=storage, work=work)
    fail_input(ValueError(f"--launcher {name!r}: not a launcher; use one of {', '.join(LAUNCHERS)}"))


@app.command()
def plan(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    device: str = typer.Option("auto", help="Device to measure the step time on: auto, cpu, cuda."),
    results: Path = RESULTS_OPT,
    measure: bool = typer.Option(True, help="Time a few training steps per distinct model to estimate cost."),
    check: bool = typer.Option(True, help="Run the closed-form sampler check of each schedule and sampler used."),
    all_arms: bool = typer.Option(
        False, "--all", help=f"List every arm (default: the first {commands.PLAN_ARMS_SHOWN})."
    ),
):
    """Show the expansion (arms x seeds) with parameters and estimated time; runs nothing.

    Example: `harness plan studies/timestep_ablation.yaml --set train.steps=500`
    """
    check_device(device)
    commands.plan(study_path, set_options, device, results, measure, check, all_arms)


@app.command()
def run(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="CPU slots sharing the cores (default: one per core, at most one per run); on CUDA, at most one per GPU. "
        "With --launcher slurm: worker jobs in the array (default: one per run, at most 8).",
    ),
    device: str = typer.Option("auto", help="auto (CUDA GPUs, else CPU), cpu or cuda."),
    rerun: bool = typer.Option(False, "--rerun", help="Run every key again from scratch (finished ones too)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the failed keys again (finished ones stay)."),
    results: Path = RESULTS_OPT,
    reports: Path = REPORTS_OPT,
    report: bool = typer.Option(True, help="Build the HTML report at the end."),
    storage: Optional[str] = STORAGE_OPT,
    launcher_name: Optional[str] = typer.Option(
        None,
        "--launcher",
        help="Where the runs execute: `local` (slots on this machine, the default), `optuna` (a shared Optuna "
        "storage; implied by --storage), `slurm` (a job array of queue workers through submitit) or "
        "`submitit-local` (the same jobs as processes here).",
    ),
    no_work: bool = typer.Option(
        False, "--no-work", help="With --storage: only enqueue the runs; `harness worker` runs them."
    ),
    arm: Optional[list[str]] = typer.Option(
        None, "--arm", help="Run only this arm (repeatable); the others stay pending in the status and the report."
    ),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: the partition."),
    time_limit: Optional[str] = typer.Option(
        None,
        "--time",
        help="slurm: each job's time limit, as sbatch reads it (240, 4:00:00, 1-12:00) [default: 4:00:00].",
    ),
    cpus_per_task: Optional[int] = typer.Option(
        None, "--cpus-per-task", min=1, help="slurm: CPUs per worker job (its torch threads on CPU) [default: 2]."
    ),
    gpus_per_task: Optional[int] = typer.Option(None, "--gpus-per-task", min=0, help="slurm: GPUs per worker job."),
    mem_gb: Optional[int] = typer.Option(None, "--mem-gb", min=1, help="slurm: memory per worker job, in GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="slurm: print the sbatch file and submit nothing."),
    wait: Optional[bool] = typer.Option(
        None,
        "--wait/--no-wait",
        help="slurm: follow the jobs to the end and report, or submit and exit [default: wait].",
    ),
):
    """Run every arm x seed of a study; finished runs are skipped, interrupted ones resume.

    Examples:

    * `harness run studies/timestep_ablation.yaml`
    * `harness run studies/capacity_ablation.yaml --set train.steps=500 --workers 2`
    * `harness run studies/objective_ablation.yaml --retry-failed`
    * `harness run studies/darkening_diagnosis.yaml --arm baseline --arm ema` (a subset of the arms)
    * `harness run studies/timestep_ablation.yaml --storage postgresql://me@db/optuna --no-work` (then start workers)
    * `harness run studies/timestep_ablation.yaml --launcher slurm --workers 8 --gpus-per-task 1 --dry-run`
    """
    check_device(device)
    if no_work and not storage:
        fail_input(ValueError("--no-work needs --storage: it enqueues the runs there for `harness worker`"))
    launcher = pick_launcher(
        launcher_name or ("optuna" if storage else "local"),
        LaunchOptions(results, reports if report else None, device, workers, rerun, retry_failed),
        storage=storage,
        arms=arm,
        work=not no_work,
        slurm=dict(
            partition=partition,
            time=time_limit,
            cpus_per_task=cpus_per_task,
            gpus_per_task=gpus_per_task,
            mem_gb=mem_gb,
            dry_run=dry_run,
            wait=wait,
        ),
    )
    raise typer.Exit(
        commands.run(study_path, set_options, arm, launcher, results=results, device=device, storage=storage)
    )


@app.command()
def worker(
    study_path: Path = typer.Argument(..., help="The study YAML file (or just its name).", show_default=False),
    storage: str = typer.Option(
        ..., "--storage", help="The Optuna storage URL the study was enqueued in.", show_default=False
    ),
    device: str = typer.Option("auto", help="auto (CUDA if visible, else CPU), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: torch's choice, all cores)."
    ),
    results: Path = RESULTS_OPT,
    heartbeat_interval: Optional[int] = typer.Option(
        None,
        "--heartbeat-interval",
        min=1,
        envvar="DDPM_ABLATE_HEARTBEAT_INTERVAL",
        help="Seconds between heartbeats of the running trial [default: 10].",
    ),
    grace_period: Optional[int] = typer.Option(
        None,
        "--grace-period",
        min=1,
        envvar="DDPM_ABLATE_GRACE_PERIOD",
        help="Seconds without a heartbeat before a run counts as dead and is re-queued [default: 30].",
    ),
    max_retry: Optional[int] = typer.Option(
        None,
        "--max-retry",
        min=0,
        envvar="DDPM_ABLATE_MAX_RETRY",
        help="Times a dead worker's run is re-queued [default: 3].",
    ),
    wait: bool = typer.Option(
        True,
        help="When the queue is empty, wait while other workers' runs are running, to take over a dead worker's run; --no-wait exits at once.",
    ),
):
    """Claim waiting runs of a study from the shared Optuna storage and run them here, until none remain.

    Tracks to MLFLOW_TRACKING_URI (a shared `mlflow server`). Enqueue first with
    `harness run STUDY --storage URL --no-work`.

    Examples:

    * `harness worker studies/timestep_ablation.yaml --storage postgresql://me@db-host/optuna`
    * `harness worker timestep_ablation --storage postgresql://me@db-host/optuna --device cuda:1`
    * `harness worker studies/timestep_ablation.yaml --storage $OPTUNA_URL --threads 4 --no-wait`
    """
    check_device(device)
    raise typer.Exit(
        commands.worker(
            study_path, storage, device, threads, results, heartbeat_interval, grace_period, max_retry, wait
        )
    )


@app.command()
def status(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    results: Path = RESULTS_OPT,
    storage: Optional[str] = STORAGE_OPT,
):
    """Show each run of a study: pending, running, finished or failed (with the reason).

    With `--storage`: each run waiting, running (on which host), done or failed, across all workers.

    Examples: `harness status studies/timestep_ablation.yaml`,
    `harness status studies/timestep_ablation.yaml --storage postgresql://me@db-host/optuna`
    """
    commands.status(study_path, set_options, results, storage)


@app.command()
def report(
    study_path: Path = STUDY_ARG,
    results: Path = RESULTS_OPT,
    reports: Path = REPORTS_OPT,
    from_mlflow: bool = typer.Option(
        False,
        "--from-mlflow",
        help="First pull the runs' Parquet tables and samples from MLFLOW_TRACKING_URI into --results (on a machine that ran nothing).",
    ),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="Optuna storage of a distributed study: implies --from-mlflow and takes the design (with its --set overrides) from the storage.",
    ),
):
    """Build reports/<study>/index.html from the study's Parquet tables.

    Examples: `harness report studies/timestep_ablation.yaml`,
    `MLFLOW_TRACKING_URI=http://mlflow-host:5000 harness report studies/timestep_ablation.yaml --from-mlflow`
    """
    commands.report(study_path, results, reports, from_mlflow, storage)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
