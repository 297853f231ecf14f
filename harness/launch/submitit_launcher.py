"""SLURM through submitit: a job array of queue workers that drain a study's Optuna queue.

``harness run STUDY --launcher slurm --workers N`` enqueues every key of the study in its
Optuna queue (``--storage``, else a SQLite file in the results folder, which every node must
see) and submits N jobs as one array; each job runs ``harness worker`` until the queue is empty.
SLURM signals a job ``signal_delay_s`` before its time limit (USR2, set by submitit): the job
stops its worker, which checkpoints the current run and puts it back in the queue, and submitit
requeues the job, whose new worker resumes that run from its checkpoint. ``--launcher
submitit-local`` runs the same jobs as local processes (submitit's LocalExecutor), the path the
tests exercise; ``--dry-run`` prints the sbatch file the array would be submitted with.

The worker is a child process, not a function call in the job: the pre-timeout signal is
handled in the job's main thread, which must stay free to stop the worker and wait for its
checkpoint (a worker running in that same thread could not be waited for).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

from rich.markup import escape

from ..store.mlflow_store import tracking_uri
from ..study.plan import RunSpec
from ..terminal import console, fail_input
from .base import Launcher, LaunchOptions
from .optuna_queue import StudyQueue, finish_study_queue, open_study_queue, wait_for_queue
from .queue_rounds import run_rounds
from .rounds import first_round, planned_specs
from .trial_queue import DistributedError, key_statuses, redact

# seconds the job gives its worker to checkpoint once told to stop; SLURM's signal comes
# signal_delay_s (default 120 here) before the kill, which leaves room for the requeue itself
STOP_TIMEOUT = 90.0
# the environment a worker needs from the submitting shell: where runs are tracked and how the
# queue judges a dead worker (a SLURM job gets the submitter's environment, a local job too,
# but the values are pinned here so a requeued job sees the same ones)
PASSED_ENV = (
    "MLFLOW_TRACKING_URI",
    "DDPM_ABLATE_HEARTBEAT_INTERVAL",
    "DDPM_ABLATE_GRACE_PERIOD",
    "DDPM_ABLATE_MAX_RETRY",
)


@dataclass(frozen=True)
class SlurmOptions:
    """What the array asks SLURM for; every job is one worker on one task."""

    partition: str | None = None
    time_min: int = 240
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    mem_gb: int | None = None
    signal_delay_s: int = 120

    def executor_parameters(self, name: str, workers: int) -> dict:
        """submitit's generic names (the local executor reads the ones it knows)."""
        params = {
            "name": name,
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "tasks_per_node": 1,
            "nodes": 1,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_array_parallelism": workers,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.gpus_per_task:
            params["slurm_gpus_per_task"] = self.gpus_per_task
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        return params


def time_minutes(text: str) -> int:
    """A time limit in whole minutes, read as sbatch reads ``--time``: M, M:S, H:M:S, D-H,
    D-H:M or D-H:M:S (seconds round up: SLURM counts whole minutes)."""
    bad = ValueError(f"--time must be minutes, M:S, H:M:S or D-H[:M[:S]] as sbatch reads it, not {text!r}")
    days, dash, clock = text.strip().partition("-")
    if not dash:
        days, clock = "0", days
    try:
        day_count, fields = int(days), [int(f) for f in clock.split(":")]
    except ValueError:
        raise bad from None
    if min([day_count, *fields]) < 0 or len(fields) > 3:
        raise bad
    if dash:  # after a day count the fields are hours[:minutes[:seconds]]
        hours, mins, secs = (fields + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        hours, mins, secs = {1: (0, fields[0], 0), 2: (0, *fields), 3: tuple(fields)}[len(fields)]
    total = day_count * 1440 + hours * 60 + mins + (1 if secs else 0)
    if total < 1:
        raise ValueError(f"--time must be at least one minute, not {text!r}")
    return total


def _stop_with_parent() -> None:
    """In the worker, before exec: SIGTERM it (checkpoint and re-queue) if the job dies first,
    e.g. killed outright; in its own session it would otherwise train on as an orphan.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the queue's heartbeat rules still hold."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class QueueWorkerJob:
    """One job of the array: ``harness worker`` on the study's queue, in a child process.

    submitit calls ``checkpoint`` on the pre-timeout signal (this class is Checkpointable by
    duck typing: submitit looks for the method): the worker is told to stop (SIGTERM: it
    checkpoints its run and re-queues it), and a fresh job with the same command is returned
    for submitit to requeue.
    """

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str):
        self.argv, self.env, self.cwd = argv, env, cwd
        self._worker: subprocess.Popen | None = None

    def __call__(self) -> int:
        # its own session: a signal SLURM sends to the job's process group reaches only the job,
        # which stops the worker gracefully, never the worker half-way through a step
        self._worker = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        # poll, not wait(): wait() holds a lock the signal handler's own wait would need
        while (code := self._worker.poll()) is None:
            time.sleep(0.5)
        if code not in (0, 1):
            raise RuntimeError(f"harness worker exited with code {code}")
        return code

    def checkpoint(self):
        import submitit

        worker = self._worker
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if worker.poll() is None:  # the run resumes from its last periodic checkpoint instead
                worker.kill()
        return submitit.helpers.DelayedSubmission(QueueWorkerJob(self.argv, self.env, self.cwd))

    def __getstate__(self) -> dict:
        return {"argv": self.argv, "env": self.env, "cwd": self.cwd, "_worker": None}


def worker_argv(study: str, url: str, results: Path, device: str, threads: int | None) -> list[str]:
    argv = [sys.executable, "-m", "harness.cli", "worker", study, "--storage", url]
    argv += ["--results", str(results), "--device", device]
    return argv + (["--threads", str(threads)] if threads else [])


def default_queue_url(results: Path) -> str:
    """A SQLite queue beside the results when no --storage is given: enough for one machine or
    a shared filesystem with working locks; PostgreSQL for anything bigger."""
    return f"sqlite:///{(results / 'optuna-queue.db').resolve()}"


class SubmititLauncher(Launcher):
    """Enqueue the study, submit ``workers`` queue-worker jobs through submitit (``cluster``
    "slurm", or "local": the same jobs as local processes), follow them, then report."""

    def __init__(
        self,
        options: LaunchOptions,
        cluster: Literal["slurm", "local"],
        *,
        storage: str | None,
        slurm: SlurmOptions | None = None,
        wait: bool = True,
        dry_run: bool = False,
    ):
        # resolved once: the jobs may start in another directory
        super().__init__(replace(options, results=Path(options.results).resolve()))
        self.cluster, self.wait, self.dry_run = cluster, wait, dry_run
        self.storage = storage or default_queue_url(self.options.results)
        self.slurm = slurm or SlurmOptions()

    def check(self, study, chosen: set[str] | None) -> None:
        name = "slurm" if self.cluster == "slurm" else "submitit-local"
        if chosen is not None or self.options.rerun:
            raise ValueError(f"--arm and --rerun are for local runs; --launcher {name} enqueues every arm")
        if study.adaptive is not None and not self.wait and not self.dry_run:
            raise ValueError(
                f"--no-wait: this study has adaptive seeds, and the process of `harness run --launcher {name}` "
                "enqueues each round; let it wait (the jobs wait for it between rounds)"
            )
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if self.cluster == "slurm" and not self.dry_run and missing:
            raise ValueError(
                f"--launcher slurm: no {' or '.join(missing)} on this machine (not a SLURM login node); "
                "--dry-run prints the job it would submit, --launcher submitit-local runs the same jobs here"
            )

    # -- the jobs
    def folder(self, study: str) -> Path:
        """submitit's pickles and logs, one folder per job under the study's results."""
        return self.options.results / study / "submitit"

    def job(self, study: str) -> QueueWorkerJob:
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env["MLFLOW_TRACKING_URI"] = tracking_uri()  # a relative sqlite path resolved here, once
        threads = None if self.slurm.gpus_per_task else self.slurm.cpus_per_task
        argv = worker_argv(study, self.storage, self.options.results, self.options.device, threads)
        return QueueWorkerJob(argv, env, str(Path.cwd()))

    def submit(self, study: str, workers: int) -> list:
        """The array: ``workers`` copies of the same job (each drains the queue)."""
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder(study) / "%j", cluster=self.cluster)
        executor.update_parameters(**self.slurm.executor_parameters(f"harness-{study}", workers))
        job = self.job(study)
        with executor.batch():  # one sbatch call: a job array on SLURM
            jobs = [executor.submit(job) for _ in range(workers)]
        return jobs

    def sbatch_text(self, study: str, workers: int) -> str:
        """The sbatch file submitit would write for the array (its own template, so the dry run
        prints what would be submitted, not a look-alike)."""
        from submitit.slurm.slurm import _make_sbatch_string

        params = self.slurm
        folder = self.folder(study) / "%j"
        command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
        text = _make_sbatch_string(
            command=command,
            folder=folder,
            job_name=f"harness-{study}",
            partition=params.partition,
            time=params.time_min,
            nodes=1,
            ntasks_per_node=1,
            cpus_per_task=params.cpus_per_task,
            gpus_per_task=params.gpus_per_task or None,
            mem=f"{params.mem_gb}GB" if params.mem_gb else None,
            signal_delay_s=params.signal_delay_s,
            map_count=workers,
            array_parallelism=workers,
        )
        worker = " ".join(shlex.quote(a) for a in self.job(study).argv)
        return f"{text}\n# each array task runs (through submitit, which requeues it on USR2):\n#   {worker}\n"

    # -- the launch
    def launch(self, study, specs: list[RunSpec]) -> int:
        """Enqueue, submit, then (unless told not to wait) follow the queue until the jobs end,
        print every key's state, pull the results from MLflow and build the report."""
        workers = self.options.workers or min(len(specs), 8)
        if self.dry_run:
            console.print(self.sbatch_text(study.study, workers), markup=False, highlight=False, soft_wrap=True)
            return 0
        try:
            import submitit  # noqa: F401 - a dependency, but say so if an environment lacks it
        except ImportError:
            fail_input(ValueError("--launcher slurm and submitit-local need submitit: pip install submitit"))
        first = specs if study.adaptive is None else planned_specs(specs, first_round(study, specs))
        try:
            q = self.open_queue(study, first)
        except DistributedError as error:
            fail_input(error)
        jobs = self.submit(study.study, workers)
        where = "SLURM" if self.cluster == "slurm" else "local processes (submitit)"
        console.print(
            f"submitted {len(jobs)} worker job(s) to {where}: {', '.join(j.job_id for j in jobs)}; "
            f"logs in {self.folder(study.study)}"
        )
        if not self.wait:
            console.print(f"follow them with: harness status {study.study} --storage {redact(self.storage)}")
            return 0
        if study.adaptive is not None:  # the jobs' workers wait between rounds while this process looks
            alive = lambda: not all(job.done() for job in jobs)  # noqa: E731
            drained, specs = run_rounds(
                q,
                study,
                specs,
                results=self.options.results,
                retry_failed=self.options.retry_failed,
                drain=partial(wait_for_queue, q, alive=alive),
            )
        codes = self.follow(jobs, q)
        code = 1 if any(c != 0 for c in codes) else 0
        if study.adaptive is not None and drained != 0:
            code = drained
        return finish_study_queue(
            q, study, specs, results=self.options.results, reports=self.options.reports, code=code
        )

    def open_queue(self, study, specs: list[RunSpec]) -> StudyQueue:
        """The study's sampler check recorded here, then every key enqueued."""
        from ..runs.sampler_checks import record_sampler_checks

        record_sampler_checks(self.options.results, study.study, specs)
        self.options.results.mkdir(parents=True, exist_ok=True)  # the default queue's file lives there
        return open_study_queue(
            study, specs, self.storage, results=self.options.results, retry_failed=self.options.retry_failed
        )

    def follow(self, jobs, q: StudyQueue, every: float = 5.0) -> list[int]:
        """Wait for the jobs, printing the queue's counts when they change; a job that ended
        with an error is reported with the end of its log, not raised."""
        shown = None
        while not all(job.done() for job in jobs):
            rows = key_statuses(q.storage, q.queue, q.manifest)
            counts: dict[str, int] = {}
            for r in rows:
                counts[str(r.state)] = counts.get(str(r.state), 0) + 1
            line = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            if line != shown:
                console.print(f"{time.strftime('%H:%M:%S')} {len(rows)} runs: {line}")
                shown = line
            time.sleep(every)
        codes = []
        for job in jobs:
            try:
                codes.append(int(job.result()))
            except Exception as error:  # noqa: BLE001 - a job's own failure, shown with its log
                tail = (job.stderr() or "")[-2000:]
                console.print(f"[red]job {job.job_id} failed:[/] {escape(str(error))}\n{escape(tail)}")
                codes.append(1)
        return codes
