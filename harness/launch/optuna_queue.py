"""Scale-out: an Optuna RDB storage (PostgreSQL) is the run queue, MLflow a shared server.

``harness run STUDY --storage URL`` turns the run list into Optuna trials, one per run key,
enqueued once as WAITING trials that carry the key and its resolved config in user attrs.
``harness worker STUDY --storage URL`` (any number, on any machines) then drains the queue:

* Claiming. A worker never calls ``study.ask()`` (with an empty queue that would let the
  sampler invent a trial). It lists the WAITING trials and moves one to RUNNING with
  ``storage.set_trial_state_values(trial_id, RUNNING)``, which is what Optuna itself does to
  pop its queue: the update happens under a row lock and returns False when another worker
  got the trial first, so each trial is claimed by exactly one worker.
* Heartbeats. While a run trains, a daemon thread records the trial's heartbeat every
  ``heartbeat_interval`` seconds (the first one is written just *before* the claim, so a
  claimed trial always has one: Optuna never considers a RUNNING trial without a heartbeat
  stale). Whenever a worker looks for work it calls ``optuna.storages.fail_stale_trials``:
  a RUNNING trial whose heartbeat is older than ``grace_period`` becomes FAIL and the
  storage's ``RetryHeartbeatStaleTrialCallback`` adds a WAITING copy of it (same user attrs,
  so the same run key and config), up to ``max_retry`` times. The copy resumes from the
  key's checkpoint if ``results/<study>/checkpoints/<key>`` is on a shared file system, else
  it starts over; either way ``RunTracker.start`` reopens the key's MLflow run, so a key
  keeps one MLflow run.
* Exit. A worker exits when no trial is WAITING and (by default, ``--wait``) no trial is
  RUNNING any more: while other workers' trials run it polls every heartbeat interval, so
  the last live worker picks up a dead worker's run once its heartbeat is stale. With
  ``--no-wait`` it exits as soon as the queue is empty.
* End states. COMPLETE with value = the run's final training loss; FAIL with user attr
  ``error`` on a Python exception (the MLflow run is FAILED with the same reason, as
  locally); a stale trial is FAIL without ``error`` (its retry copy carries on). A worker
  stopped by SIGINT/SIGTERM checkpoints, marks its trial FAIL (user attr ``interrupted``)
  and puts a WAITING copy back in the queue.
* A run key finishes once. Before running a claimed trial, the worker checks for a COMPLETE
  trial of the same key (then the claimed one is PRUNED as a duplicate) and for a finished
  run of the key in MLflow or in its local Parquet results (then the trial is COMPLETE
  without running). A worker whose trial was declared stale while it was in fact alive
  notices on its next heartbeat and abandons the run, leaving it to the retry.

Reports on a machine that ran nothing: ``pull_from_mlflow`` downloads the Parquet tables
and sample grids that ``RunTracker`` logged as artifacts of each finished MLflow run, and
rebuilds the ``runs`` rows from the MLflow runs' tags, metrics and status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..store.states import RunState
from ..study.plan import RunSpec, study_manifest, write_manifest
from ..terminal import console, fail_input
from .base import Launcher, LaunchOptions
from .queue_worker import warn_local_tracking, work_on_storage
from .trial_queue import (
    DistributedError,
    QueueSettings,
    create_queue,
    enqueue,
    open_storage,
    print_status,
    pull_from_mlflow,
    redact,
)


@dataclass
class StudyQueue:
    """A study enqueued in its Optuna storage, with what its launcher needs afterwards."""

    url: str
    settings: QueueSettings
    storage: Any
    queue: Any
    manifest: dict
    client: Any


def open_study_queue(study, specs: list[RunSpec], url: str, *, results: Path, retry_failed: bool) -> StudyQueue:
    """Create the Optuna study and the MLflow experiment and enqueue every key once (a key
    already waiting, running or done is left alone); says what it enqueued."""
    from ..store.tracking import ensure_experiment, make_client

    settings = QueueSettings.from_env()
    storage = open_storage(url, settings)
    manifest = study_manifest(study, specs)
    queue = create_queue(storage, manifest)
    write_manifest(results, manifest)
    client = make_client()
    ensure_experiment(client, study.study, study.question)
    outcome = enqueue(queue, specs, retry_failed=retry_failed)
    console.print(
        f"[bold]{study.study}[/]: {len(specs)} runs; enqueued {len(outcome.enqueued)}, "
        f"{len(outcome.present)} already waiting, running or done"
        + (f", {len(outcome.failed)} failed (not retried without --retry-failed)" if outcome.failed else "")
        + f"; Optuna {redact(url)}; MLflow {client.tracking_uri}"
    )
    warn_local_tracking(console, client.tracking_uri)
    return StudyQueue(url, settings, storage, queue, manifest, client)


def finish_study_queue(
    q: StudyQueue, study, specs: list[RunSpec], *, results: Path, reports: Path | None, code: int
) -> int:
    """Once the workers are done: every key's state, the results pulled from MLflow and the
    report; the exit code (130 stopped or runs left in the queue, 1 some failed, else ``code``)."""
    rows = print_status(console, q.storage, q.queue, q.manifest)
    if reports is not None:
        configs = {s.key: s.config_json for s in specs}
        pull_from_mlflow(q.client, study.study, results, q.manifest, configs, log=console.print)
        from ..report.page import build_report

        console.print(f"report: {build_report(study.study, results, reports)}")
    if code == 130:
        return code
    if any(r.state is RunState.FAILED for r in rows):
        return 1
    left = any(r.state in (RunState.PENDING, RunState.RUNNING) for r in rows)
    return 130 if code == 0 and left else code


def run_on_storage(
    study,
    specs: list[RunSpec],
    url: str,
    *,
    results: Path,
    reports: Path | None,
    device: str,
    retry_failed: bool,
    work: bool,
) -> int:
    """`harness run --storage`: enqueue the study, then (unless ``work`` is False) drain the
    queue here as one worker and report. With adaptive seeds this process coordinates the
    rounds (harness.launch.queue_rounds), working on each round unless ``work`` is False."""
    if study.adaptive is not None:
        from .queue_rounds import run_rounds
        from .rounds import first_round, planned_specs

        first = planned_specs(specs, first_round(study, specs))
        q = open_study_queue(study, first, url, results=results, retry_failed=retry_failed)
        join = f"harness worker {study.study} --storage {redact(url)}"
        if work:
            drain = partial(_work_here, q, results, device)
        else:
            console.print(
                f"adaptive seeds: this process enqueues each round; keep it running and start workers with: {join}"
            )
            drain = partial(wait_for_queue, q)
        code, ran = run_rounds(q, study, specs, results=results, retry_failed=retry_failed, drain=drain)
        return finish_study_queue(q, study, ran, results=results, reports=reports, code=code)
    q = open_study_queue(study, specs, url, results=results, retry_failed=retry_failed)
    if not work:
        console.print(f"start workers with: harness worker {study.study} --storage {redact(url)}")
        return 0
    code = _work_here(q, results, device)
    return finish_study_queue(q, study, specs, results=results, reports=reports, code=code)


def _work_here(q: StudyQueue, results: Path, device: str) -> int:
    """Drain the queue in this process as one worker; it exits once nothing waits or runs."""
    return work_on_storage(
        q.queue,
        q.storage,
        results=results,
        device=device,
        settings=q.settings,
        wait=True,
        console=console,
        rounds=False,
    )


def wait_for_queue(q: StudyQueue, alive: Callable[[], bool] = lambda: True) -> int:
    """Wait until no trial of the study waits or runs (other processes' workers drain it),
    printing the counts when they change; 0, 1 when ``alive`` says the workers are gone with
    trials left, or 130 on Ctrl-C."""
    from optuna.trial import TrialState

    shown = None
    try:
        while True:
            left = q.queue.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
            counts = {
                state.name.lower(): sum(t.state == state for t in left)
                for state in (TrialState.WAITING, TrialState.RUNNING)
            }
            if not any(counts.values()):
                return 0
            if not alive():
                console.print(f"[red]every worker job has ended with runs left in the queue[/] ({counts})")
                return 1
            line = ", ".join(f"{n} {state}" for state, n in counts.items())
            if line != shown:
                console.print(f"{time.strftime('%H:%M:%S')} queue: {line}")
                shown = line
            time.sleep(q.settings.heartbeat_interval)
    except KeyboardInterrupt:
        return 130


class OptunaQueueLauncher(Launcher):
    """Enqueues every key of the study in a shared Optuna storage (``storage``, a URL), then
    works on the queue here as one worker (unless ``work`` is False) and builds the report
    (``reports`` None: no report). Other machines join with `harness worker`."""

    def __init__(self, options: LaunchOptions, *, storage: str, work: bool = True):
        super().__init__(options)
        self.storage, self.work = storage, work

    def check(self, study, chosen: set[str] | None) -> None:
        if chosen is not None:
            raise ValueError("--arm is for local runs; with --storage every arm is enqueued")

    def launch(self, study, specs: list[RunSpec]) -> int:
        from ..runs.sampler_checks import record_sampler_checks

        o = self.options
        record_sampler_checks(o.results, study.study, specs)
        if o.rerun:
            fail_input(ValueError("--rerun is not supported with --storage (use --retry-failed, or a new study name)"))
        if o.workers is not None and o.workers > 1:
            fail_input(ValueError("--workers is for local runs; with --storage start more `harness worker` processes"))
        try:
            return run_on_storage(
                study,
                specs,
                self.storage,
                results=o.results,
                reports=o.reports,
                device=o.device,
                retry_failed=o.retry_failed,
                work=self.work,
            )
        except DistributedError as error:
            fail_input(error)
