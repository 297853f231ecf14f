"""MLflow and results/ made to agree on a study's finished runs, each rebuilt from the other.

Both remember every finished run: results/<study> as Parquet tables with the `runs` row that
the ledger reads, MLflow as a run with tags, params, metrics and the same tables as
artifacts. Either can be lost on its own (results/ deleted, mlflow.db deleted or replaced by
``harness.store.check_store``, a kill while a run was being recorded), and `harness run`
mends it before it reports what there is to run:

* results/ -> MLflow. A key finished in results/ whose MLflow run is missing, not FINISHED
  or without its summary gets the run created or completed from the Parquet tables: tags and
  params as ``RunTracker`` writes them, every metric point the run logged that MLflow lacks
  (the engine logs the train and probe rows at their steps and the quality row at the last
  step, ddpm_engine.experiment; the per_t and drift curves as ``tracking.curve_metrics``),
  the dataset input, the tables, config and sample grid as artifacts; then FINISHED.
* MLflow -> results/. A key MLflow finished that results/ does not record as finished is not
  trained again: its tables and sample grid are downloaded from the run's artifacts and its
  `runs` row rebuilt from the run; tables the artifacts lack are named.

A key another `harness run` holds (harness.claims) is left to it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow.entities import Metric

from .claims import KeyClaims
from .ledger import PRECEDENCE, Ledger, from_mlflow
from .lifecycle import RunState
from .plan import RunSpec
from .store import local_folder
from .tables import ARTIFACT_FOLDERS, write_table
from .tracking import CURVE_METRICS, METRIC_BATCH, RunTracker, curve_metrics, dataset_input

SUMMARY_SENTINEL = "seconds"  # logged with the summary, the last of a run's metrics, by every engine version


def all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def runs_by_key(client, experiment_id: str) -> dict[str, Any]:
    """Each run key's MLflow run: a finished one first (ledger precedence), then the newest."""

    def rank(run) -> tuple[int, int]:
        return PRECEDENCE.index(from_mlflow(run.info.status)), -run.info.start_time

    chosen: dict[str, Any] = {}
    for run in all_runs(client, experiment_id):
        key = run.data.tags.get("run_key")
        if key and (key not in chosen or rank(run) < rank(chosen[key])):
            chosen[key] = run
    return chosen


def runs_row_from_mlflow(run, status: RunState, config_json: str) -> dict[str, Any]:
    """A `runs` row (without run_key) from an MLflow run's tags, metrics and times."""
    tags, metrics = run.data.tags, run.data.metrics
    end = run.info.end_time or run.info.start_time
    seconds = metrics.get("seconds")
    if seconds is None and run.info.end_time:
        seconds = (run.info.end_time - run.info.start_time) / 1000
    return {
        "study": tags.get("study", ""),
        "arm": tags.get("arm", ""),
        "seed": int(tags.get("seed", -1)),
        **{k.split(".", 1)[1]: v for k, v in tags.items() if k.startswith("ablation.")},
        "status": str(status),
        "error": tags.get("error", ""),
        "note": tags.get("note", ""),
        "mlflow_run_id": run.info.run_id,
        "params": float(metrics.get("params", math.nan)),
        "seconds": float(seconds) if seconds is not None else math.nan,
        "config_json": config_json,
        # a run finished before the version was tagged counts as version 1 (ledger.measure_version)
        "measure_version": float(tags.get("measure_version", math.nan)),
        "host": tags.get("host", ""),
        "updated": datetime.fromtimestamp(end / 1000, timezone.utc).isoformat(timespec="seconds") if end else "",
    }


def restore_from_mlflow(client, run, spec: RunSpec, results: Path) -> list[str]:
    """Download the run's tables and sample grid into results/<study> where missing and write
    its `runs` row as finished; returns the artifact folders the run lacks."""
    folder = Path(results) / spec.study
    present = {a.path for a in client.list_artifacts(run.info.run_id)}
    missing = []
    for name in ARTIFACT_FOLDERS:
        if name not in present:
            missing.append(name)
        elif not list((folder / name).glob(f"{spec.key}.*")):
            client.download_artifacts(run.info.run_id, name, str(folder))
    write_table(
        results,
        spec.study,
        "runs",
        spec.key,
        pd.DataFrame([runs_row_from_mlflow(run, RunState.FINISHED, spec.config_json)]),
    )
    return missing


def logged_points(results: Path, spec: RunSpec) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] that a run logged to MLflow, from its Parquet tables."""
    tables = {}
    for name in ("train", "probe", "quality", *CURVE_METRICS):
        path = Path(results) / spec.study / name / f"{spec.key}.parquet"
        if path.exists():
            tables[name] = pd.read_parquet(path).drop(columns="run_key", errors="ignore")
    points: dict[str, list[tuple[int, float]]] = {}

    def add(name: str, step: int, value) -> None:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value):
            points.setdefault(name, []).append((int(step), float(value)))

    for name in ("train", "probe"):  # streamed as scalars at their steps while training
        for row in tables.get(name, pd.DataFrame()).to_dict("records"):
            step = row.pop("step")
            for metric, value in row.items():
                add(metric, step, value)
    quality = tables.get("quality")
    if quality is not None and not quality.empty:  # the summary, at the last step
        summary = quality.iloc[-1].to_dict()
        last = summary.get("train_steps")  # the step the engine logs its summary at
        if last is None or not np.isfinite(last):
            last = tables["train"]["step"].max() if "train" in tables and not tables["train"].empty else 0
        for metric, value in summary.items():
            add(metric, last, value)
    for name in CURVE_METRICS:
        if name in tables:
            for metric in curve_metrics(name, tables[name], 0):
                add(metric.key, metric.step, metric.value)
    return points


LOGGED_ROWS_TAG = "logged_rows"  # JSON: table -> its Parquet rows whose metric points MLflow was seen to hold
LOGGED_TABLES = ("train", "probe", "quality", *CURVE_METRICS)  # the tables whose rows are metric points


def parquet_rows(results: Path, spec: RunSpec) -> str:
    """The key's row count per logged table, from the Parquet footers (no data read), as the
    text of ``LOGGED_ROWS_TAG``: equal texts mean MLflow's history was completed for these rows."""
    counts = {}
    for name in LOGGED_TABLES:
        path = Path(results) / spec.study / name / f"{spec.key}.parquet"
        if path.exists():
            counts[name] = pq.read_metadata(path).num_rows
    return json.dumps(counts, sort_keys=True)


def add_missing_points(client, run_id: str, results: Path, spec: RunSpec, history: bool = True) -> int:
    """Log each metric point of the key's Parquet tables that the run's MLflow history lacks
    (``history`` False: a new run, which has none) and tag the run with the rows now covered;
    returns the points added. A point MLflow holds already is never logged again."""
    now, added = int(time.time() * 1000), []
    for name, points in logged_points(results, spec).items():
        # a point counts as logged once per time MLflow holds it (bpd is logged twice at the
        # last step: the last probe's and the summary's)
        logged = Counter((m.step, m.value) for m in client.get_metric_history(run_id, name)) if history else Counter()
        for offset, (step, value) in enumerate(points):
            if logged[(step, value)] > 0:
                logged[(step, value)] -= 1
            else:  # distinct times: MLflow keeps one of two points equal in time, step and value
                added.append(Metric(name, value, now + offset, step))
    for i in range(0, len(added), METRIC_BATCH):
        client.log_batch(run_id, metrics=added[i : i + METRIC_BATCH])
    client.set_tag(run_id, LOGGED_ROWS_TAG, parquet_rows(results, spec))
    return len(added)


def rebuild_in_mlflow(
    client, experiment_id: str, spec: RunSpec, results: Path, run=None, commit: str = "", tags=None
) -> tuple[str, int]:
    """Create the key's MLflow run (``run`` None) or complete ``run`` from results/, then mark
    it FINISHED; returns (its run id, the metric points added). With ``run`` None a run an
    earlier, killed rebuild left (an adoption killed before its `runs` row) is completed, not
    logged over a second time. ``tags`` are set before the run is FINISHED: a FINISHED run is
    what a later `harness run` restores the key from, so what it must carry (an adoption's
    ``reused_from``) cannot come after."""
    tracker = RunTracker(client, experiment_id, spec, results, commit or "unknown")
    folder = Path(results) / spec.study
    if run is None:
        tracker.open_mlflow_run()
        run = client.get_run(tracker.run_id) if tracker.resumed else None
    if run is None:
        client.set_tag(tracker.run_id, "rebuilt_from", str(folder))
        present, inputs = set(), []
    else:
        tracker.run_id = run.info.run_id
        present = {a.path for a in client.list_artifacts(run.info.run_id)}
        inputs = run.inputs.dataset_inputs if run.inputs else []
    run_id = tracker.run_id
    added = add_missing_points(client, run_id, results, spec, history=run is not None)
    if run is not None and (added or needs_mending(run)):
        client.set_tag(run_id, "completed_from", str(folder))
    dataset = folder / "dataset" / f"{spec.key}.parquet"
    if dataset.exists() and not inputs:
        client.log_inputs(run_id, datasets=[dataset_input(pd.read_parquet(dataset))])
    for name in ARTIFACT_FOLDERS:
        files = sorted((folder / name).glob(f"{spec.key}.*"))
        if files and name not in present:
            client.log_artifact(run_id, str(files[0]), artifact_path=name)
    config = folder / "configs" / f"{spec.key}.yaml"
    if "config" not in present and config.exists():
        client.log_artifact(run_id, str(config), artifact_path="config")
    grid = folder / "samples" / f"{spec.key}.png"
    if "images" not in present and grid.exists():
        from PIL import Image

        with Image.open(grid) as picture:
            client.log_image(run_id, picture, key="samples", step=0)
    if run is not None and "error" in run.data.tags:  # an earlier attempt's failure no longer describes it
        client.delete_tag(run_id, "error")
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status="FINISHED")
    return run_id, added


def needs_mending(run, rows: str | None = None) -> bool:
    """Whether a finished key's MLflow run must be created or completed from results/: it is
    missing, not FINISHED, without its summary, its artifacts folder is gone (a project folder
    moved without them, a deleted mlartifacts/), or (given the Parquet ``rows``) its history
    was never seen to cover them (a resume after a kill loses the points its async logger
    held; runs of older code have no tag and are looked at once)."""
    if run is None or run.info.status != "FINISHED" or SUMMARY_SENTINEL not in run.data.metrics:
        return True
    folder = local_folder(run.info.artifact_uri or "")
    if folder is not None and not folder.exists():
        return True
    return rows is not None and run.data.tags.get(LOGGED_ROWS_TAG) != rows


@dataclass
class Mended:
    restored: list[RunSpec] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)  # run key -> artifact folders MLflow lacks
    rebuilt: list[RunSpec] = field(default_factory=list)
    completed: list[RunSpec] = field(default_factory=list)
    points: int = 0


def reconcile(
    client,
    experiment_id: str,
    specs: list[RunSpec],
    results: Path,
    claims: KeyClaims,
    running: set[str],
    log: Callable[[str], None] = print,
    commit: str = "",
) -> Mended:
    """Mend MLflow from results/ and results/ from MLflow for the planned keys of ``specs``
    that this process does not run now (``running``), and say what was done."""
    if not specs:
        return Mended()
    study, results = specs[0].study, Path(results)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per table drowns the messages
    ledger = Ledger.load(results, study)
    mlflow_runs = runs_by_key(client, experiment_id)
    to_restore, to_mend = [], []
    for spec in specs:
        run = mlflow_runs.get(spec.key)
        if spec.key in running:
            continue
        if ledger.is_finished(spec.key):
            if needs_mending(run, parquet_rows(results, spec)):
                to_mend.append(spec)
        elif run is not None and run.info.status == "FINISHED":
            to_restore.append(spec)
    mine, _ = claims.acquire(to_restore + to_mend)  # a key another process holds is left to it
    mended = Mended()
    try:
        for spec in mine:
            run = mlflow_runs.get(spec.key)
            if spec in to_restore:
                missing = restore_from_mlflow(client, run, spec, results)
                mended.restored.append(spec)
                if missing:
                    mended.missing[spec.key] = missing
            else:
                broken = needs_mending(run)  # before: mending brings back its artifacts folder
                run_id, added = rebuild_in_mlflow(client, experiment_id, spec, results, run, commit)
                mended.points += added
                if run is None:
                    mended.rebuilt.append(spec)
                elif added or broken:  # a run only looked at and found whole is not news
                    mended.completed.append(spec)
                row = ledger.row(spec.key)
                if row.get("mlflow_run_id") != run_id:  # the finished row names the run it has now
                    updated = {k: v for k, v in row.items() if k != "run_key"} | {"mlflow_run_id": run_id}
                    write_table(results, study, "runs", spec.key, pd.DataFrame([updated]))
    finally:
        for spec in mine:
            claims.release(spec.key)
    _say(mended, study, results, log)
    return mended


def _say(mended: Mended, study: str, results: Path, log: Callable[[str], None]) -> None:
    where = results / study
    if mended.restored:
        log(
            f"restored {len(mended.restored)} run(s) of {study} that MLflow finished but {where} did not record as "
            "finished: their tables downloaded from MLflow, not trained again"
        )
    for key, folders in mended.missing.items():
        spec = next(s for s in mended.restored if s.key == key)
        log(
            f"[yellow]{spec.name} ({key}): its MLflow run has no {', '.join(folders)} artifacts, so results/ "
            f"lacks them and the report shows the run without them (`--rerun --arm {spec.arm.label}` trains "
            "the arm again)[/]"
        )
    if mended.rebuilt:
        log(f"rebuilt {len(mended.rebuilt)} MLflow run(s) of {study} from {where}: the MLflow store had none of them")
    if mended.completed:
        log(
            f"completed {len(mended.completed)} MLflow run(s) of {study} from {where} "
            f"({mended.points} metric points added in all): they were not marked finished, or lacked metric points or artifacts"
        )
