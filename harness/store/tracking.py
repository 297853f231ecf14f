"""Tracking: a Recorder that fans one run's events out to MLflow and Parquet.

One MLflow experiment per study, one MLflow run per run key (a resumed key reuses its run),
the `runs` Parquet row as this machine's record of the key's state (``harness.runs.ledger``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from PIL import Image

from ..study.plan import RunSpec, flat_config
from .history import LOGGED_ROWS_TAG, METRIC_BATCH, add_missing_points, curve_metrics, parquet_rows
from .mlflow_store import ARTIFACTS_FOLDER, StoreFailure, prepare_store, tracking_uri, transient
from .states import Outcome, RunState
from .tables import write_table

PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def make_client() -> MlflowClient:
    uri = tracking_uri()
    prepare_store(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # worker processes inherit the same store
    # MLflow's async logger otherwise polls its queue with a 1 s timeout, so every run's end
    # waited up to 1 s for it to stop; buffering also merges a run's metrics into few writes.
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "2")
    return MlflowClient(tracking_uri=uri)


def artifact_location(study: str) -> str | None:
    """Artifacts beside the default SQLite store go to ./mlartifacts, never ./mlruns: a
    ./mlruns folder makes a plain `mlflow ui` pick the (refused) file store instead of
    mlflow.db. A tracking server chooses its own artifact root."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:"):
        return (Path.cwd() / ARTIFACTS_FOLDER / study).as_uri()
    return None


def chart_view_route(experiment_id: str) -> str:
    """The part after the MLflow UI's address (e.g. http://127.0.0.1:5000/) that opens an
    experiment's runs in the chart view, where per_t/* and drift/* overlay one line per run.

    `workflowType=machine_learning` because MLflow 3's UI (3.17 at least) picks GenAI or
    model-training pages by its own sidebar switch, default GenAI, and not by the experiment's
    `mlflow.experimentKind` tag: a bare #/experiments/<id> lands on the GenAI overview."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"


def ensure_experiment(client: MlflowClient, study: str, question: str = "") -> str:
    """The study's experiment id, created (or restored from deletion) if needed. Tagged as a
    model-development experiment (MLflow 3 UIs that route by the tag open it in the runs view
    rather than the GenAI one; 3.17's does not, see ``chart_view_route``) with the study's
    question as its description."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(study, artifact_location=artifact_location(study))
        except Exception:  # another process created it between the two calls
            experiment = client.get_experiment_by_name(study)
            if experiment is None:
                raise
        else:
            experiment = client.get_experiment(experiment_id)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    wanted = {"mlflow.experimentKind": "custom_model_development"}
    if question:
        wanted["mlflow.note.content"] = question
    for key, value in wanted.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files have uncommitted changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        if commit != "unknown":
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
            )
            if status.stdout.strip():
                commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_input(frame: pd.DataFrame) -> DatasetInput:
    """The engine's `dataset` row (ddpm_engine.data.describe_split) as an MLflow dataset input
    of context "training": MLflow shows it on the run and in its Datasets filter, and keeps one
    dataset per (name, digest) per experiment, so runs on the same split share it."""
    row = frame.iloc[0]
    source = str(row["source"])
    if source.startswith("/"):  # a folder or file: MLflow's local source
        source_type, source_json = "local", {"uri": Path(source).as_uri()}
    else:  # a loader in code (sklearn.datasets.load_digits)
        source_type, source_json = "code", {"tags": {"mlflow.source.name": source}}
    profile = {
        "num_rows": int(row["train_images"]),
        "heldout_images": int(row["heldout_images"]),
        "shape": [int(row["channels"]), int(row["image_size"]), int(row["image_size"])],
        "levels": int(row["levels"]),
    }
    dataset = Dataset(
        name=str(row["name"]),
        digest=str(row["digest"]),
        source_type=source_type,
        source=json.dumps(source_json),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def log_dataset_input(client, run_id: str, frame: pd.DataFrame) -> None:
    """Log the split (``dataset_input``) on the run. Two runs starting together on one split
    (two queue workers on a fresh experiment) can race MLflow's look-up-then-insert of the
    dataset, and the loser's call fails on the unique key: tried once more, it links the
    winner's row (mlflow_store.DATASET_RACE). A GuardedClient retries it by itself."""
    dataset = dataset_input(frame)
    try:
        client.log_inputs(run_id, datasets=[dataset])
    except StoreFailure:
        raise
    except Exception as error:  # noqa: BLE001 - anything but the race is raised as it was
        if not transient(error):
            raise
        client.log_inputs(run_id, datasets=[dataset])


def find_mlflow_run(client: MlflowClient, experiment_id: str, key: str):
    """The live (not deleted) MLflow run of a run key, newest first, or None."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"]
    )
    return found[0] if found else None


class RunTracker:
    """The Recorder of one run: MLflow metrics and Parquet tables.

    Metrics go through MLflow's asynchronous logger where the tracker is called from the
    training loop itself (a distributed worker): a write never holds up a step. With
    ``synchronous`` (the local parent, which trains nothing) each batch is written before the
    call returns: a store that fails is then seen at the call that met it, within the bound
    of a ``store.GuardedClient``, rather than in MLflow's logging threads, which log each
    failed batch with a traceback, report it only to whoever waits for it and, at exit, wait
    out the lock once more for every batch still queued.

    With a ``store.GuardedClient`` (the local parent's), a store that fails for good is not a
    crash: the MLflow half of each call is skipped from then on, the Parquet half (tables, the
    `runs` row) goes on, and ``store_failure`` says why; the scheduler stops the slots at their
    checkpoints and the next `harness run` writes the records into MLflow (harness.runs.reconcile)."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        spec: RunSpec,
        results: Path,
        commit: str = "",
        synchronous: bool = False,
    ):
        self.client, self.experiment_id, self.spec = client, experiment_id, spec
        self.results = Path(results)
        self.commit = commit or git_commit()
        self.synchronous = synchronous
        self.run_id: str | None = None
        self.started = time.time()
        self.paths: list[Path] = []
        self.pending: list = []
        self.resumed = False  # the key's MLflow run was reopened: an earlier attempt logged into it
        self.superseded = False  # earlier MLflow runs of the key were replaced by this one
        self.lost_points = False  # a batch of metrics MLflow failed to store asynchronously

    @property
    def store_failure(self) -> StoreFailure | None:
        """Why the MLflow store stopped taking this run's records, if it did."""
        return getattr(self.client, "failure", None)

    @property
    def study(self) -> str:
        return self.spec.study

    def start(self, fresh: bool = False) -> str | None:
        """Create the key's MLflow run, or reopen the one a previous attempt left behind, and
        record the key as running. With ``fresh`` (a --rerun, a re-measure) a new run replaces
        the key's earlier ones: one run per key."""
        self.started = time.time()
        with suppress(StoreFailure):
            self.open_mlflow_run(fresh)
        self.write_runs_row(RunState.RUNNING)
        return self.run_id

    def open_mlflow_run(self, fresh: bool = False) -> str:
        """The MLflow half of ``start``: the key's run created (tags, params) or reopened; with
        ``fresh`` a new one, and the earlier ones superseded (``supersede``)."""
        existing = find_mlflow_run(self.client, self.experiment_id, self.spec.key)
        earlier = []
        if existing is not None and fresh:
            earlier = self.client.search_runs([self.experiment_id], f"tags.run_key = '{self.spec.key}'")
            existing = None
        if existing is not None:
            self.run_id = existing.info.run_id
            self.resumed = True
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            if "error" in existing.data.tags:  # an earlier attempt's failure no longer describes the run
                self.client.delete_tag(self.run_id, "error")
        else:
            spec = self.spec
            tags = {
                "study": spec.study,
                "arm": spec.arm.label,
                "seed": str(spec.seed),
                "run_key": spec.key,
                "git_commit": self.commit,
                "mlflow.source.name": f"harness run {spec.study}",
                "mlflow.source.type": "LOCAL",
                "mlflow.source.git.commit": self.commit.removesuffix("-dirty"),
                "git_dirty": str(self.commit.endswith("-dirty")).lower(),
                "host": socket.gethostname(),
                **{f"ablation.{axis}": level for axis, level in spec.arm.levels.items()},
            }
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=spec.name)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in flat_config(spec.config.to_dict()).items()]
            for i in range(0, len(params), PARAM_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + PARAM_BATCH])
        self.supersede(earlier)
        return self.run_id

    def supersede(self, earlier: list) -> None:
        """Delete the key's earlier MLflow runs, each tagged ``superseded_by`` this run first
        (a deleted run stays in the store until `mlflow gc`; `MlflowClient.restore_run` brings
        it back). A re-measured run's new run then holds one point per step, where logging
        into the old one gave the final metrics twice; its history is completed from the
        tables when it ends (the training's points were not streamed again)."""
        for run in earlier:
            self.client.set_tag(run.info.run_id, "superseded_by", self.run_id)
            self.client.delete_run(run.info.run_id)
        self.superseded = bool(earlier)

    # -- Recorder protocol
    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        if metrics and self.run_id is not None:
            with suppress(StoreFailure):
                self.log_metrics(metrics)

    def table(self, name: str, frame: pd.DataFrame) -> None:
        self.paths.append(write_table(self.results, self.study, name, self.spec.key, frame))
        if self.run_id is None:
            return
        with suppress(StoreFailure):
            if name == "dataset":
                log_dataset_input(self.client, self.run_id, frame)
            metrics = curve_metrics(name, frame, int(time.time() * 1000))
            for i in range(0, len(metrics), METRIC_BATCH):
                self.log_metrics(metrics[i : i + METRIC_BATCH])

    def log_metrics(self, metrics: list[Metric]) -> None:
        if self.synchronous:
            self.client.log_batch(self.run_id, metrics=metrics)
        else:
            self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def image(self, name: str, pixels: np.ndarray) -> None:
        folder = self.results / self.study / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.spec.key}.png"
        picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        picture.save(path)
        self.paths.append(path)
        if self.run_id is not None:
            with suppress(StoreFailure):
                self.client.log_image(self.run_id, picture, key=name, step=0)  # MLflow's image view, per run

    # -- lifecycle
    def flush(self) -> None:
        """Wait until every metric sent so far is stored. A batch MLflow failed to store (its
        asynchronous logger met a lock longer than its own 20 s wait, say) marks the run's
        history for completion from the tables when it ends (``record_history``)."""
        for operation in self.pending:
            if operation is None:
                continue
            try:
                operation.wait()
            except Exception:  # noqa: BLE001 - whatever the store raised: the points are logged again
                self.lost_points = True
        self.pending.clear()

    def _terminate(self, status: str) -> None:
        # set_terminated drains MLflow's async queue at once before it sets the status, where
        # waiting on each operation first would sit out the buffering interval
        self.client.set_terminated(self.run_id, status=status)
        self.flush()

    def end(self, outcome: Outcome) -> None:
        """Record how the run ended (``harness.runs.lifecycle.execute``'s outcome)."""
        if outcome.state is RunState.FINISHED:
            self.finish(outcome.summary, note=outcome.reason)
        elif outcome.state is RunState.INTERRUPTED:
            self.interrupted(outcome.reason)
        else:
            self.fail(outcome.reason)

    def finish(self, summary: dict[str, float], note: str = "") -> None:
        """Log the config and tables as artifacts and mark the key finished; ``note`` (what else
        happened to the run, e.g. a checkpoint set aside) goes into its tag and `runs` row."""
        from ddpm_engine.metrics import MEASURE_VERSION

        config_path = self.results / self.study / "configs" / f"{self.spec.key}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(self.spec.config.to_dict(), sort_keys=False))
        if self.run_id is not None:
            with suppress(StoreFailure):
                if note:
                    self.client.set_tag(self.run_id, "note", note[:5000])
                # MLflow's copy of the version, for a `runs` row rebuilt from the MLflow run
                self.client.set_tag(self.run_id, "measure_version", str(MEASURE_VERSION))
                self.client.log_artifact(self.run_id, str(config_path), artifact_path="config")
                for path in self.paths:
                    self.client.log_artifact(self.run_id, str(path), artifact_path=path.parent.name)
                self._terminate("FINISHED")
                self.record_history()
        self.write_runs_row(RunState.FINISHED, params=summary.get("params"), seconds=summary.get("seconds"), note=note)

    def record_history(self) -> None:
        """Tag the run with the Parquet rows its metric history covers (history.LOGGED_ROWS_TAG),
        after the points are stored: a run that never lost any is tagged at once; a resumed one
        (its earlier attempt was killed with points not yet stored: events its parent had not
        recorded, batches an asynchronous logger held), one whose batches MLflow's asynchronous
        logger failed to store, and one that replaced the key's earlier run (a
        re-measure streams no training points) first get each point their history lacks.
        Tagged after FINISHED, so a kill in between leaves a run reconcile looks at again."""
        if self.resumed or self.superseded or self.lost_points:
            add_missing_points(self.client, self.run_id, self.results, self.spec)
        else:
            self.client.set_tag(self.run_id, LOGGED_ROWS_TAG, parquet_rows(self.results, self.spec))

    def fail(self, reason: str) -> None:
        if self.run_id is not None:
            with suppress(StoreFailure):
                self.client.set_tag(self.run_id, "error", reason[:5000])
                self._terminate("FAILED")
        self.write_runs_row(RunState.FAILED, error=reason)

    def interrupted(self, reason: str) -> None:
        if self.run_id is not None:
            with suppress(StoreFailure):
                self._terminate("KILLED")
        self.write_runs_row(RunState.INTERRUPTED, error=reason)

    def write_runs_row(
        self, status: RunState, error: str = "", params=None, seconds=None, note: str = "", measure_version=None
    ) -> None:
        """The key's `runs` row. ``measure_version``: the MEASURE_VERSION of its tables when
        they were not made by this code (adopted from another study), else this code's."""
        from ddpm_engine.metrics import MEASURE_VERSION

        spec = self.spec
        row = {
            "study": spec.study,
            "arm": spec.arm.label,
            "seed": spec.seed,
            **{axis: level for axis, level in spec.arm.levels.items()},
            "status": str(status),
            "error": error,
            "note": note,
            "mlflow_run_id": self.run_id or "",
            "params": float(params) if params is not None else float("nan"),
            "seconds": float(seconds) if seconds is not None else time.time() - self.started,
            "config_json": spec.config_json,
            "measure_version": int(MEASURE_VERSION if measure_version is None else measure_version),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_table(self.results, spec.study, "runs", spec.key, pd.DataFrame([row]))
