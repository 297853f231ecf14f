"""The Parquet tables of a study: one file per (table, run key), written atomically.

Layout: ``<results>/<study>/<table>/<run_key>.parquet``. Readers take a whole table as one
pyarrow dataset. Column meanings: ``table_columns()`` (from the engine's metric registry),
rendered in docs/design.md, "Tables". t is 1-based.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ddpm_engine.files import atomic_write

# The `runs` table is the harness's own record of each run; every other table's columns are
# the engine's, declared with their meanings in ddpm_engine.metrics (docs/design.md lists them).
RUNS_COLUMNS: dict[str, str] = {
    "run_key": "first 12 hex of sha256 over the canonical JSON of (resolved config, seed)",
    "study": "study name",
    "arm": "arm label",
    "seed": "training seed",
    "<axis>": "one column per ablation axis, holding the arm's level name",
    "status": "pending | running | finished | failed | interrupted (harness.store.states.RunState)",
    "error": "failure reason (empty unless failed or interrupted)",
    "note": "what else happened to the run, kept although it went on (e.g. its checkpoint did not load)",
    "mlflow_run_id": "the MLflow run of this key",
    "params": "model parameter count",
    "seconds": "wall time of the run",
    "config_json": "the resolved engine config as canonical JSON",
    "measure_version": "the engine's MEASURE_VERSION that made the run's tables (older ones are re-measured)",
    "host": "machine that ran it",
    "pid": "process that ran it",
    "updated": "UTC time of this row",
}


def table_columns() -> dict[str, dict[str, str]]:
    """table -> column -> meaning, for every table a run writes (run_key added to each)."""
    from ddpm_engine.metrics import TABLES as ENGINE_TABLES

    out = {"runs": RUNS_COLUMNS}
    for table, metrics in ENGINE_TABLES.items():
        out[table] = {"run_key": "run", **{name: m.definition for name, m in metrics.items()}}
    return out


TABLES = ["runs", "dataset", "train", "per_t", "probe", "drift", "drift_hist", "quality"]
# What a finished run leaves besides its `runs` row: its tables and sample grid (MLflow artifacts).
ARTIFACT_FOLDERS = [t for t in TABLES if t != "runs"] + ["samples"]


def table_path(results: Path, study: str, table: str, run_key: str) -> Path:
    return Path(results) / study / table / f"{run_key}.parquet"


def write_table(results: Path, study: str, table: str, run_key: str, frame: pd.DataFrame) -> Path:
    """Write one run's rows of ``table``, tagged with ``run_key``; temp file then rename, so
    a reader never sees half a file and a rerun replaces rather than duplicates rows."""
    path = table_path(results, study, table, run_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.copy()
    if "run_key" in frame.columns:
        frame = frame.drop(columns="run_key")
    frame.insert(0, "run_key", run_key)
    return write_frame(path, frame)


def write_frame(path: Path, frame: pd.DataFrame) -> Path:
    """One Parquet file, atomically: temp file then rename."""
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    return atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def read_table(results: Path, study: str, table: str, quarantined: list[Path] | None = None) -> pd.DataFrame:
    """All runs' rows of ``table`` as one DataFrame (empty if none were written).

    A file that cannot be read (truncated by a full disk or a kill outside our atomic writes,
    or damaged by hand) is set aside as ``<name>.corrupt`` (renamed, never deleted) and its
    path appended to ``quarantined``: its run key then counts as not done and is run again."""
    folder = Path(results) / study / table
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    schemas = []
    for path in files:
        try:
            schemas.append((path, pq.read_schema(path)))
        except (pa.ArrowInvalid, OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
            if quarantined is not None:
                quarantined.append(path)
    if not schemas:
        return pd.DataFrame()
    # Runs of one study may differ in optional columns (a failed run's empty table): read
    # them all under the union of their schemas.
    schema = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
    dataset = ds.dataset([str(p) for p, _ in schemas], format="parquet", schema=schema)
    return dataset.to_table().to_pandas()
