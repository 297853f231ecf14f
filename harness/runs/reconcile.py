"""MLflow and results/ made to agree on a study's finished runs, each rebuilt from the other.

Both remember every finished run: results/<study> as Parquet tables with the `runs` row that
the ledger reads, MLflow as a run with tags, params, metrics and the same tables as
artifacts. Either can be lost on its own (results/ deleted, mlflow.db deleted or replaced by
``harness.store.mlflow_store.check_store``, a kill while a run was being recorded), and `harness run`
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

A key another `harness run` holds (harness.runs.claims) is left to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..store.history import parquet_rows
from ..store.rebuild import all_runs, needs_mending, rebuild_in_mlflow, restore_from_mlflow
from ..store.tables import write_table
from ..study.plan import RunSpec
from .claims import KeyClaims
from .ledger import PRECEDENCE, Ledger, from_mlflow


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
