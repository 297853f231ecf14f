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

import math
import os
import socket
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from rich.markup import escape

from ..runs.ledger import PRECEDENCE, Ledger, from_mlflow, from_trials
from ..runs.lifecycle import RunAbandoned, execute
from ..store.states import Outcome, RunState
from ..store.tables import write_table
from ..study.plan import Arm, RunSpec, run_key, study_manifest, write_manifest
from ..terminal import console, fail_input
from .base import Launcher

DEFAULT_HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
DEFAULT_GRACE_PERIOD = 30  # seconds without a heartbeat before a running trial is stale
DEFAULT_MAX_RETRY = 3  # times a stale trial is put back in the queue
ENV_HEARTBEAT = "DDPM_ABLATE_HEARTBEAT_INTERVAL"
ENV_GRACE = "DDPM_ABLATE_GRACE_PERIOD"
ENV_MAX_RETRY = "DDPM_ABLATE_MAX_RETRY"
MANIFEST_ATTR = "manifest"

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats, fail_stale_trials and the retry callback are flagged experimental since 2.8
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class DistributedError(ValueError):
    """Bad input for a distributed command (reported like a study error, exit code 2)."""


# ---------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class QueueSettings:
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = DEFAULT_MAX_RETRY

    @classmethod
    def from_env(
        cls, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int | None = None
    ) -> QueueSettings:
        """Explicit values, else the DDPM_ABLATE_* environment variables, else the defaults."""

        def pick(value, env, default):
            if value is not None:
                return int(value)
            try:
                return int(os.environ.get(env) or default)
            except ValueError:
                raise DistributedError(f"{env} must be a whole number of seconds, not {os.environ[env]!r}") from None

        settings = cls(
            pick(heartbeat_interval, ENV_HEARTBEAT, DEFAULT_HEARTBEAT_INTERVAL),
            pick(grace_period, ENV_GRACE, DEFAULT_GRACE_PERIOD),
            pick(max_retry, ENV_MAX_RETRY, DEFAULT_MAX_RETRY),
        )
        if settings.heartbeat_interval < 1 or settings.grace_period < 1 or settings.max_retry < 0:
            raise DistributedError("heartbeat interval and grace period must be >= 1 s, max retry >= 0")
        if settings.grace_period <= settings.heartbeat_interval:
            raise DistributedError(
                f"the grace period ({settings.grace_period} s) must be longer than the heartbeat "
                f"interval ({settings.heartbeat_interval} s), or live runs would be retried"
            )
        return settings


def _retry_callback(max_retry: int):
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=max_retry)


def db_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, while this project depends on psycopg2(-binary)."""
    if url.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, settings: QueueSettings | None = None) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats and the stale-trial retry callback."""
    settings = settings or QueueSettings.from_env()
    if not url or "://" not in url:
        raise DistributedError(f"--storage must be a database URL such as postgresql://user@host/db, not {url!r}")
    url = db_url(url)
    callback = _retry_callback(settings.max_retry)
    # Optuna >= 4.9 names it heartbeat_stale_trial_callback; failed_trial_callback before.
    import inspect

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is flagged experimental
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                **{name: callback},
            )
        except Exception as exc:  # noqa: BLE001 - a wrong URL or an unreachable server
            raise DistributedError(
                f"cannot open the Optuna storage {redact(url)}: {type(exc).__name__}: {exc}"
            ) from None


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def create_queue(storage, manifest: dict) -> optuna.Study:
    """The study's Optuna study (created if needed), holding the design as a user attr."""
    study = optuna.create_study(
        storage=storage,
        study_name=manifest["study"],
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(),
    )
    if study.user_attrs.get(MANIFEST_ATTR) != manifest:
        study.set_user_attr(MANIFEST_ATTR, manifest)
    return study


def load_queue(storage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise DistributedError(
            f"no study {name!r} in the Optuna storage: enqueue it first with `harness run STUDY --storage URL --no-work`"
        ) from None


def trial_key(trial) -> str | None:
    return trial.user_attrs.get("run_key") or trial.system_attrs.get("fixed_params", {}).get("run_key")


def trials_by_key(study: optuna.Study) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial_key(trial)
        if key:
            grouped.setdefault(key, []).append(trial)
    return grouped


def spec_attrs(spec: RunSpec) -> dict[str, Any]:
    """What a worker needs to run the key, stored on its trial (copied to retries)."""
    return {
        "run_key": spec.key,
        "study": spec.study,
        "arm": spec.arm.label,
        "seed": spec.seed,
        "levels": dict(spec.arm.levels),
        "overrides": dict(spec.arm.overrides),
        "config": spec.config.to_dict(),
    }


def spec_from_attrs(attrs: dict[str, Any]) -> RunSpec:
    """The RunSpec a trial was enqueued with; the config is the one resolved at enqueue time
    (with its --set overrides), checked against the run key."""
    from ddpm_engine.config import ExperimentConfig

    config = ExperimentConfig.model_validate(attrs["config"])
    seed = int(attrs["seed"])
    key = run_key(config, seed)
    if key != attrs["run_key"]:
        raise DistributedError(
            f"the config stored with run key {attrs['run_key']} resolves to key {key} here: "
            "workers must run the same harness version as the `harness run` that enqueued it"
        )
    arm = Arm(label=attrs["arm"], levels=dict(attrs.get("levels") or {}), overrides=dict(attrs.get("overrides") or {}))
    return RunSpec(study=attrs["study"], arm=arm, seed=seed, config=config, key=key)


@dataclass
class EnqueueResult:
    enqueued: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # waiting, running or done already
    failed: list[str] = field(default_factory=list)  # failed and not re-enqueued


def enqueue(study: optuna.Study, specs: list[RunSpec], retry_failed: bool = False) -> EnqueueResult:
    """One WAITING trial per run key that has none yet (longest runs first). A key whose
    trials all failed is enqueued again only with ``retry_failed``."""
    from .slots import estimated_cost

    existing = trials_by_key(study)
    result = EnqueueResult()
    for spec in sorted(specs, key=estimated_cost, reverse=True):
        trials = existing.get(spec.key, [])
        state = from_trials(t.state.name for t in trials)
        if trials and state is not RunState.FAILED:  # waiting (pending), running or finished
            result.present.append(spec.key)
        elif trials and not retry_failed:
            result.failed.append(spec.key)
        else:
            study.enqueue_trial({"run_key": spec.key}, user_attrs=spec_attrs(spec))
            result.enqueued.append(spec.key)
    return result


# ---------------------------------------------------------------------------- worker


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
    ):
        from ..store.tracking import ensure_experiment, git_commit, make_client

        # the study's own (cached) storage: Optuna's cache must see every trial we touch
        self.storage, self.study, self.results = study._storage, study, Path(results)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.device, self.wait, self.log = device, wait, log
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
            # Heartbeat first: a RUNNING trial without any heartbeat is never found stale.
            self.storage.record_heartbeat(trial._trial_id)
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    continue  # another worker claimed it first
            except UpdateFinishedTrialError:
                continue
            return trial._trial_id
        return None

    def running_elsewhere(self) -> int:
        return len(self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,)))

    def run(self) -> WorkerResult:
        announced = False
        while not self.stop.is_set():
            trial_id = self.claim()
            if trial_id is not None:
                announced = False
                self.run_trial(trial_id)
                continue
            running = self.running_elsewhere()
            if not running or not self.wait:
                self.log(
                    "no waiting trials" + (f"; {running} still running elsewhere" if running else "") + ": worker exits"
                )
                break
            if not announced:
                self.log(
                    f"queue empty; waiting while {running} trial(s) run elsewhere (a dead worker's run is retried here)"
                )
                announced = True
            self.stop.wait(self.settings.heartbeat_interval)
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


def spec_attrs_keys() -> set[str]:
    return {"run_key", "study", "arm", "seed", "levels", "overrides", "config"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- status


@dataclass
class KeyStatus:
    run_key: str
    arm: str
    seed: int
    state: RunState
    host: str = ""
    attempts: int = 0
    note: str = ""  # e.g. "waiting", "not enqueued", why it was re-queued or failed


def key_statuses(storage, study: optuna.Study, manifest: dict) -> list[KeyStatus]:
    """Each planned run key's state across all workers, from its trials (``ledger.from_trials``)."""
    grouped = trials_by_key(study)
    try:
        stale = set(storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)))
    except Exception:  # noqa: BLE001 - heartbeats disabled or an older Optuna
        stale = set()
    rows = []
    for planned in manifest.get("runs", []):
        key = planned["run_key"]
        trials = sorted(grouped.get(key, []), key=lambda t: t.number)
        state = from_trials(t.state.name for t in trials)
        attempts = sum(t.state != TrialState.WAITING and "skipped" not in t.user_attrs for t in trials)
        row = KeyStatus(key, planned["arm"], int(planned["seed"]), state, attempts=attempts)
        latest = {s: [t for t in trials if t.state == s][-1:] for s in TrialState}
        if not trials:
            row.note = "not enqueued"
        elif state is RunState.FINISHED:
            trial = latest[TrialState.COMPLETE][0]
            row.host, row.note = trial.user_attrs.get("host", ""), trial.user_attrs.get("skipped", "")
        elif state is RunState.RUNNING:
            trial = latest[TrialState.RUNNING][0]
            row.host = f"{trial.user_attrs.get('host', '?')} (pid {trial.user_attrs.get('pid', '?')})"
            if trial._trial_id in stale:
                row.note = "no heartbeat: retried when a worker next looks for work"
        elif state is RunState.PENDING:
            trial = latest[TrialState.WAITING][0]
            interrupted = trial.system_attrs.get("requeued_from", -1)
            lost = (trial.system_attrs.get("retry_history") or [-1])[-1]
            row.note = "waiting"
            if interrupted > lost:
                row.note = f"waiting: re-queued after trial {interrupted} was interrupted"
            elif lost >= 0:
                row.note = f"waiting: re-queued after trial {lost} lost its worker"
        elif latest[TrialState.FAIL]:
            trial = latest[TrialState.FAIL][0]
            row.host = trial.user_attrs.get("host", "")
            row.note = (
                trial.user_attrs.get("error")
                or trial.user_attrs.get("interrupted")
                or "worker lost (no heartbeat) and retries exhausted"
            )
        else:
            row.note = latest[TrialState.PRUNED][0].user_attrs.get("skipped", "pruned")
        rows.append(row)
    return rows


def print_status(console, storage, study: optuna.Study, manifest: dict) -> list[KeyStatus]:
    from rich.table import Table

    rows = key_statuses(storage, study, manifest)
    colors = {RunState.FINISHED: "green", RunState.RUNNING: "cyan", RunState.PENDING: "yellow", RunState.FAILED: "red"}
    table = Table(title=f"runs of {study.study_name} (Optuna storage)", title_justify="left")
    for column in ("arm", "seed", "run key", "state", "host", "attempts", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            escape(r.arm),
            str(r.seed),
            r.run_key,
            f"[{colors.get(r.state, 'dim')}]{r.state}[/]",
            r.host,
            str(r.attempts),
            escape(r.note),
        )
    console.print(table)
    shown = (RunState.FINISHED, RunState.RUNNING, RunState.PENDING, RunState.FAILED)
    arms = Table(title="arms", title_justify="left")
    for column in ("arm", "finished", "running (host)", "pending", "failed"):
        arms.add_column(column, overflow="fold")
    for arm in dict.fromkeys(r.arm for r in rows):
        mine = [r for r in rows if r.arm == arm]
        running = [r for r in mine if r.state is RunState.RUNNING]
        arms.add_row(
            escape(arm),
            str(sum(r.state is RunState.FINISHED for r in mine)),
            f"{len(running)}" + (f" ({', '.join(r.host.split(' ')[0] for r in running)})" if running else ""),
            str(sum(r.state is RunState.PENDING for r in mine)),
            str(sum(r.state is RunState.FAILED for r in mine)),
        )
    console.print(arms)
    console.print(f"{len(rows)} runs: " + ", ".join(f"{sum(r.state is s for r in rows)} {s}" for s in shown))
    return rows


# ---------------------------------------------------------------------------- report


def pull_from_mlflow(
    client,
    study: str,
    results: Path,
    manifest: dict,
    configs: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Rebuild ``results/<study>`` from the study's MLflow experiment: the Parquet tables and
    sample grid that each finished run logged as artifacts, one ``runs`` row per run key from
    the MLflow run's tags, metrics and status, and study.json from ``manifest``."""
    from ..store.rebuild import all_runs, runs_row_from_mlflow
    from ..store.tables import ARTIFACT_FOLDERS

    results = Path(results)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise DistributedError(
            f"no MLflow experiment {study!r} at {client.tracking_uri}: set MLFLOW_TRACKING_URI to the tracking server the workers used"
        )
    write_manifest(results, manifest)
    configs = configs or {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = Ledger.load(results, study)
    newest: dict[str, Any] = {}

    def rank(run) -> tuple[int, int]:  # a key's finished run first (ledger precedence), then the newest
        return PRECEDENCE.index(from_mlflow(run.info.status)), -run.info.start_time

    for run in all_runs(client, experiment.experiment_id):
        key = run.data.tags.get("run_key")
        if key and (key not in newest or rank(run) < rank(newest[key])):
            newest[key] = run
    counts = {"runs": 0, "downloaded": 0, "up_to_date": 0}
    for key, run in newest.items():
        counts["runs"] += 1
        status = from_mlflow(run.info.status)
        here = local.row(key)
        same_run = local.is_finished(key) and here.get("mlflow_run_id") == run.info.run_id
        if status is RunState.FINISHED:
            fresh = same_run and (results / study / "quality" / f"{key}.parquet").exists()
            if fresh:
                counts["up_to_date"] += 1
            else:
                present = {a.path for a in client.list_artifacts(run.info.run_id)}
                for folder in ARTIFACT_FOLDERS:
                    if folder in present:
                        client.download_artifacts(run.info.run_id, folder, str(results / study))
                counts["downloaded"] += 1
        if status is RunState.FINISHED and same_run:
            continue  # the local row is as good (it has the pid and exact timings)
        write_table(
            results, study, "runs", key, pd.DataFrame([runs_row_from_mlflow(run, status, configs.get(key, ""))])
        )
    log(
        f"pulled {counts['runs']} MLflow run(s) of {study} into {results / study} "
        f"({counts['downloaded']} downloaded, {counts['up_to_date']} already here)"
    )
    planned = {r["run_key"] for r in manifest.get("runs", [])}
    unplanned = [k for k in newest if k not in planned]
    if unplanned:
        log(
            f"[yellow]{len(unplanned)} MLflow run(s) have run keys this study file does not plan "
            "(an earlier version of the study, or one run with --set): with --storage the design is "
            "taken from the Optuna study instead[/]"
        )
    return counts


# ---------------------------------------------------------------------------- commands


def storage_manifest(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(MANIFEST_ATTR)


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
    console,
) -> int:
    """`harness run --storage`: create the Optuna study and the MLflow experiment, enqueue
    every key once, then (unless ``work`` is False) drain the queue as one worker."""
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
    _warn_local_tracking(console, client.tracking_uri)
    if not work:
        console.print(f"start workers with: harness worker {study.study} --storage {redact(url)}")
        return 0
    code = work_on_storage(
        queue, storage, results=results, device=device, settings=settings, wait=True, console=console
    )
    rows = print_status(console, storage, queue, manifest)
    if reports is not None:
        configs = {s.key: s.config_json for s in specs}
        pull_from_mlflow(client, study.study, results, manifest, configs, log=console.print)
        from ..report.page import build_report

        console.print(f"report: {build_report(study.study, results, reports)}")
    if code == 130:
        return code
    return 1 if any(r.state is RunState.FAILED for r in rows) else code


def _warn_local_tracking(console, uri: str) -> None:
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
) -> int:
    """Run a worker in this process with Ctrl-C / SIGTERM checkpointing and re-queueing."""
    import signal

    if threads:
        import torch

        torch.set_num_threads(threads)
    manifest = storage_manifest(queue)
    if manifest:
        write_manifest(results, manifest)
    stop = threading.Event()
    worker = Worker(storage, queue, results, device=device, settings=settings, wait=wait, log=console.print, stop=stop)
    _warn_local_tracking(console, worker.client.tracking_uri)
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


def resolve_study_name(study_arg: Path) -> str:
    """A study YAML file (its `study:` name), or a bare study name."""
    from ..study.spec import load_study

    if study_arg.is_file():
        return load_study(study_arg, []).study
    if study_arg.suffix in (".yaml", ".yml"):
        raise DistributedError(f"study file not found: {study_arg}")
    return str(study_arg)


class OptunaQueueLauncher(Launcher):
    """Enqueues every key of the study in a shared Optuna storage (``storage``, a URL), then
    works on the queue here as one worker (unless ``work`` is False) and builds the report
    (``reports`` None: no report). Other machines join with `harness worker`."""

    def __init__(
        self,
        *,
        storage: str,
        results: Path,
        reports: Path | None,
        device: str = "auto",
        workers: int | None = None,
        rerun: bool = False,
        retry_failed: bool = False,
        work: bool = True,
    ):
        self.storage, self.results, self.reports, self.device = storage, results, reports, device
        self.workers, self.rerun, self.retry_failed, self.work = workers, rerun, retry_failed, work

    def check(self, study, chosen: set[str] | None) -> None:
        if chosen is not None:
            raise ValueError("--arm is for local runs; with --storage every arm is enqueued")
        if study.adaptive is not None:
            raise study.error(("seeds",), "adaptive seeds run locally for now; with --storage list the seeds")

    def launch(self, study, specs: list[RunSpec]) -> int:
        from ..runs.sampler_checks import record_sampler_checks

        record_sampler_checks(self.results, study.study, specs)
        if self.rerun:
            fail_input(ValueError("--rerun is not supported with --storage (use --retry-failed, or a new study name)"))
        if self.workers is not None and self.workers > 1:
            fail_input(ValueError("--workers is for local runs; with --storage start more `harness worker` processes"))
        try:
            return run_on_storage(
                study,
                specs,
                self.storage,
                results=self.results,
                reports=self.reports,
                device=self.device,
                retry_failed=self.retry_failed,
                work=self.work,
                console=console,
            )
        except DistributedError as error:
            fail_input(error)
