"""One finished run's record rebuilt from the other store: its MLflow run created or completed
from the Parquet tables in results/, or its tables and `runs` row downloaded from MLflow. Which
keys need it, and which of them another process holds, is decided by harness.runs.reconcile.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..study.plan import RunSpec
from .history import LOGGED_ROWS_TAG, add_missing_points
from .mlflow_store import local_folder
from .states import RunState
from .tables import ARTIFACT_FOLDERS, write_table
from .tracking import RunTracker, log_dataset_input

SUMMARY_SENTINEL = "seconds"  # logged with the summary, the last of a run's metrics, by every engine version


def all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
        log_dataset_input(client, run_id, pd.read_parquet(dataset))
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
