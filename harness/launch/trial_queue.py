"""The run queue in an Optuna RDB storage (harness.launch.optuna_queue): opening the storage,
the queue (an Optuna study named after the study, its design in a user attr), run specs as
trial attrs, enqueueing each key once, each key's state across workers, and a results/ folder
pulled from MLflow for a report on a machine that ran nothing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from optuna.trial import TrialState
from rich.markup import escape

from ..runs.ledger import PRECEDENCE, Ledger, from_mlflow, from_trials
from ..store.states import RunState
from ..store.tables import write_table
from ..study.plan import Arm, RunSpec, run_key, write_manifest

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


def spec_attrs_keys() -> set[str]:
    return {"run_key", "study", "arm", "seed", "levels", "overrides", "config"}


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
        # private, and the one left: Optuna's public fail_stale_trials would fail and re-queue
        # them, which a read-only `harness status` must not do (docs/design.md, section 7)
        stale_ids = storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name))
        stale = {storage.get_trial_number_from_id(trial_id) for trial_id in stale_ids}
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
            if trial.number in stale:
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
    from ..runs.repair import damaged_tables
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
            # a table missing or cut short here is put back from the run's artifact copy, as the
            # local path's repair does (harness.runs.repair), instead of counting as here
            damaged = damaged_tables(results, study, [key]).get(key, []) if same_run else []
            if same_run and not damaged:
                counts["up_to_date"] += 1
            else:
                if damaged:
                    log(
                        f"{key}: {', '.join(damaged)} missing or unreadable here: restored from MLflow run {run.info.run_id}"
                    )
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


def storage_manifest(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(MANIFEST_ATTR)


def resolve_study_name(study_arg: Path) -> str:
    """A study YAML file (its `study:` name), or a bare study name."""
    from ..study.spec import load_study

    if study_arg.is_file():
        return load_study(study_arg, []).study
    if study_arg.suffix in (".yaml", ".yml"):
        raise DistributedError(f"study file not found: {study_arg}")
    return str(study_arg)
