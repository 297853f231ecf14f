"""`harness worker`: claims waiting trials of a study from the queue (harness.launch.trial_queue)
and runs them in this process, with heartbeats, until none remain (the claiming, heartbeat and
exit rules are in harness.launch.optuna_queue's docstring).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from rich.markup import escape

from ..runs.ledger import Ledger, from_mlflow
from ..runs.lifecycle import RunAbandoned, execute
from ..store.states import Outcome, RunState
from ..study.plan import RunSpec, write_manifest
from .queue_rounds import rounds_open
from .trial_queue import (
    QueueSettings,
    spec_attrs_keys,
    spec_from_attrs,
    storage_manifest,
    trial_key,
    trials_by_key,
)


class Heartbeat:
    """Records a trial's heartbeat every interval on a daemon thread; sets ``lost`` when the
    trial is no longer RUNNING (another worker declared it stale and retried it)."""

    def __init__(self, storage, trial_id: int, interval: int, log: Callable[[str], None]):
        self.storage, self.trial_id, self.interval, self.log = storage, trial_id, interval, log
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
                if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the run
                self.log(f"[yellow]heartbeat of trial {self.trial_id} failed:[/] {type(exc).__name__}: {exc}")


@dataclass
class WorkerResult:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False


class Worker:
    """Claims WAITING trials of one study and runs them in this process until none remain."""

    def __init__(
        self,
        storage,
        study: optuna.Study,
        results: Path,
        *,
        device: str = "auto",
        settings: QueueSettings | None = None,
        wait: bool = True,
        log: Callable[[str], None] = print,
        stop: threading.Event | None = None,
        rounds: bool = True,
    ):
        from ..store.tracking import ensure_experiment, git_commit, make_client

        # the study's own (cached) storage: Optuna's cache must see every trial we touch
        self.storage, self.study, self.results = study._storage, study, Path(results)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.device, self.wait, self.log = device, wait, log
        # wait for an adaptive study's next round while its coordinator holds the lease; the
        # coordinator's own worker does not (it must return for the coordinator to look)
        self.rounds = rounds
        self.settings = settings or QueueSettings.from_env()
        self.stop = stop or threading.Event()
        self.client = make_client()
        self.experiment_id = ensure_experiment(
            self.client, study.study_name, (storage_manifest(study) or {}).get("question", "")
        )
        self.commit = git_commit()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.result = WorkerResult()

    # -- the queue
    def claim(self) -> int | None:
        """Fail stale trials (re-queueing them), then move one WAITING trial to RUNNING."""
        optuna.storages.fail_stale_trials(self.study)
        waiting = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: t.number):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            # Heartbeat first: a RUNNING trial without any heartbeat is never found stale.
            self.storage.record_heartbeat(trial_id)
            try:
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    continue  # another worker claimed it first
            except UpdateFinishedTrialError:
                continue
            return trial_id
        return None

    def running_elsewhere(self) -> int:
        return len(self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,)))

    def run(self) -> WorkerResult:
        said = ""  # what this worker last said it waits for: said once per wait

        def waiting(why: str) -> None:
            nonlocal said
            if why != said:
                self.log(why)
                said = why
            self.stop.wait(self.settings.heartbeat_interval)

        while not self.stop.is_set():
            trial_id = self.claim()
            if trial_id is not None:
                said = ""
                self.run_trial(trial_id)
                continue
            running = self.running_elsewhere()
            if not running and self.wait and self.rounds and rounds_open(self.storage, self.study_id):
                waiting("queue empty; waiting for the coordinator's next round of seeds")
                continue
            if not running or not self.wait:
                self.log(
                    "no waiting trials" + (f"; {running} still running elsewhere" if running else "") + ": worker exits"
                )
                break
            waiting("queue empty; waiting while trials run elsewhere (a dead worker's run is retried here)")
        if self.stop.is_set():
            self.result.interrupted = True
        return self.result

    # -- one trial
    def run_trial(self, trial_id: int) -> None:
        from ..runs.checkpoints import checkpoint_dir
        from ..store.tracking import RunTracker

        with Heartbeat(self.storage, trial_id, self.settings.heartbeat_interval, self.log) as heartbeat:
            trial = optuna.trial.Trial(self.study, trial_id)
            frozen = self.storage.get_trial(trial_id)
            key = trial_key(frozen) or "?"
            attempt = len(frozen.system_attrs.get("retry_history", [])) + 1
            for name, value in {
                "host": self.host,
                "pid": self.pid,
                "worker": f"{self.host}:{self.pid}",
                "claimed_at": _now(),
                "attempt": attempt,
            }.items():
                trial.set_user_attr(name, value)
            tracker = None
            try:
                spec = spec_from_attrs(frozen.user_attrs)
                if self._skip_if_done(trial, spec):
                    return
                self.log(
                    f"trial {trial.number}: running {spec.name} ({spec.key})"
                    + (f", attempt {attempt}" if attempt > 1 else "")
                    + f" on {self.host}"
                )
                tracker = RunTracker(self.client, self.experiment_id, spec, self.results, self.commit)
                tracker.start()
                trial.set_user_attr("mlflow_run_id", tracker.run_id)

                def should_stop() -> bool:
                    if heartbeat.lost.is_set():
                        raise RunAbandoned()
                    return self.stop.is_set()

                outcome = execute(
                    spec.config,
                    tracker,
                    device=self.device,
                    checkpoint_dir=checkpoint_dir(self.results, spec),
                    should_stop=should_stop,
                )
            except RunAbandoned:
                self._abandon(trial, tracker)
                return
            except Exception as exc:  # a bad trial (its config) or MLflow failing before the run started
                outcome = Outcome(
                    RunState.FAILED, reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
                )
            if outcome.state is RunState.FAILED and heartbeat.lost.is_set():
                self._abandon(trial, tracker)
                return
            self._record(trial, frozen, key, tracker, outcome)

    def _record(self, trial, frozen, key: str, tracker, outcome: Outcome) -> None:
        """The outcome on the tracker and as the trial's Optuna state. Finished counts even if
        the trial was declared stale meanwhile: its retry then finds the key done."""
        if tracker is not None and tracker.run_id is not None:
            tracker.end(outcome)
        if outcome.state is RunState.FINISHED:
            value = float(outcome.summary.get("final_loss", math.nan))
            if not math.isfinite(value):
                _set_attr(trial, "note", f"final loss {value}; stored as inf")
                value = math.inf
            self._tell(trial, TrialState.COMPLETE, value)
            self.result.finished.append(key)
            self.log(f"[green]finished[/] {key}: final loss {value:.4f}")
        elif outcome.state is RunState.INTERRUPTED:
            _set_attr(trial, "interrupted", f"stopped by a signal at step {outcome.step}; re-queued")
            self._tell(trial, TrialState.FAIL)
            self._requeue(frozen)
            self.log(f"[yellow]interrupted[/] {key} at step {outcome.step}: checkpointed and put back in the queue")
        else:
            _set_attr(trial, "error", outcome.reason[:5000])
            _set_attr(trial, "traceback", outcome.traceback[-5000:])
            self._tell(trial, TrialState.FAIL)
            self.result.failed.append(key)
            self.log(f"[red]failed[/] {key}: {escape(outcome.reason)}")

    def _skip_if_done(self, trial, spec: RunSpec) -> bool:
        """A key that already finished (a COMPLETE trial, a FINISHED MLflow run, a finished
        Parquet row here) is not run again."""
        from ..store.tracking import find_mlflow_run

        for other in trials_by_key(self.study).get(spec.key, []):
            if other.number == trial.number:
                continue
            if other.state == TrialState.COMPLETE:
                why = f"duplicate: run key already completed by trial {other.number}"
            elif other.state == TrialState.RUNNING:
                why = f"duplicate: run key already running as trial {other.number}"
            else:
                continue
            _set_attr(trial, "skipped", why)
            self._tell(trial, TrialState.PRUNED)
            self.result.skipped.append(spec.key)
            self.log(f"trial {trial.number} ({spec.key}) skipped: {why}")
            return True
        value, why = None, None
        run = find_mlflow_run(self.client, self.experiment_id, spec.key)
        if run is not None and from_mlflow(run.info.status) is RunState.FINISHED:
            value, why = run.data.metrics.get("final_loss"), f"already finished in MLflow run {run.info.run_id}"
        elif Ledger.load(self.results, spec.study).is_finished(spec.key):
            why = f"already finished in {self.results / spec.study}"
        if why is None:
            return False
        _set_attr(trial, "skipped", why)
        self._tell(trial, TrialState.COMPLETE, value if value is not None and math.isfinite(value) else math.inf)
        self.result.skipped.append(spec.key)
        self.log(f"trial {trial.number} ({spec.key}) not run: {why}")
        return True

    def _tell(self, trial, state: TrialState, value: float | None = None) -> None:
        try:
            self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except (ValueError, UpdateFinishedTrialError) as exc:
            # declared stale by another worker between our last heartbeat and now
            self.log(f"[yellow]trial {trial.number} could not be marked {state.name}:[/] {exc}")

    def _abandon(self, trial, tracker) -> None:
        """Our trial was declared stale and retried elsewhere: leave the run to the retry."""
        if tracker is not None:
            tracker.flush()
        self.log(
            f"[yellow]trial {trial.number} was declared stale (no heartbeat for {self.settings.grace_period} s) "
            "and retried elsewhere: abandoning it here[/]"
        )

    def _requeue(self, frozen) -> None:
        """Put an interrupted run back in the queue (not counted as a stale retry)."""
        user_attrs = {k: v for k, v in frozen.user_attrs.items() if k in spec_attrs_keys()}
        system_attrs = {
            k: v for k, v in frozen.system_attrs.items() if k in ("fixed_params", "retry_history", "failed_trial")
        }
        system_attrs["requeued_from"] = frozen.number
        self.study.add_trial(
            optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=user_attrs, system_attrs=system_attrs)
        )


def _set_attr(trial, name: str, value: Any) -> None:
    """A user attr on our trial, unless another worker already finished it (declared stale)."""
    try:
        trial.set_user_attr(name, value)
    except UpdateFinishedTrialError:
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def warn_local_tracking(console, uri: str) -> None:
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        console.print(
            f"[yellow]MLFLOW_TRACKING_URI is not a tracking server ({uri}): workers on other machines "
            "will not see these runs; set it to e.g. http://mlflow-host:5000[/]"
        )


def work_on_storage(
    queue: optuna.Study,
    storage,
    *,
    results: Path,
    device: str,
    settings: QueueSettings,
    wait: bool,
    console,
    threads: int | None = None,
    rounds: bool = True,
) -> int:
    """Run a worker in this process with Ctrl-C / SIGTERM checkpointing and re-queueing
    (``rounds`` False: exit between an adaptive study's rounds, as its coordinator does)."""
    import signal

    if threads:
        import torch

        torch.set_num_threads(threads)
    manifest = storage_manifest(queue)
    if manifest:
        write_manifest(results, manifest)
    stop = threading.Event()
    worker = Worker(
        storage,
        queue,
        results,
        device=device,
        settings=settings,
        wait=wait,
        log=console.print,
        stop=stop,
        rounds=rounds,
    )
    warn_local_tracking(console, worker.client.tracking_uri)
    console.print(
        f"worker {worker.host}:{worker.pid} on {device}: study {queue.study_name}, "
        f"heartbeat every {settings.heartbeat_interval} s, stale after {settings.grace_period} s, "
        f"up to {settings.max_retry} retries"
    )

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        console.print("[yellow]stopping: checkpointing the current run and putting it back in the queue...[/]")
        stop.set()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        result = worker.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print(
        f"worker done: {len(result.finished)} finished, {len(result.failed)} failed, "
        f"{len(result.skipped)} skipped as already done"
    )
    if result.interrupted:
        return 130
    return 1 if result.failed else 0
