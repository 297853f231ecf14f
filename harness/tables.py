"""The Parquet tables of a study: one file per (table, run key), written atomically.

Layout: ``<results>/<study>/<table>/<run_key>.parquet``. Readers take a whole table as one
pyarrow dataset. This module is the one place the columns are documented (DESIGN.md sec. 5);
columns may be added, the ones below keep their names and meanings. t is 1-based.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

TABLE_COLUMNS: dict[str, dict[str, str]] = {
    "runs": {
        "run_key": "first 12 hex of sha256 over the canonical JSON of (resolved config, seed)",
        "study": "study name",
        "arm": "arm label",
        "seed": "training seed",
        "<axis>": "one column per ablation axis, holding the arm's level name",
        "status": "running | finished | failed | interrupted",
        "error": "failure reason (empty unless failed)",
        "mlflow_run_id": "the MLflow run of this key",
        "params": "model parameter count",
        "seconds": "wall time of the run",
        "config_json": "the resolved engine config as canonical JSON",
        "host": "machine that ran it",
        "updated": "UTC time of this row",
    },
    "train": {
        "run_key": "run", "step": "optimizer step", "loss": "mean training loss since the last row",
        "lr": "learning rate", "grad_norm": "mean gradient norm before clipping",
        "images_per_s": "training throughput since the last row",
    },
    "per_t": {
        "run_key": "run", "step": "training step of the probe", "t": "timestep (1..T)",
        "alphabar": "alphabar_t", "snr": "alphabar_t / (1 - alphabar_t)",
        "wt": "DDPM eq. 12 weight of L_t for the run's sigma",
        "loss_mse": "per-dimension MSE of the predicted noise on held-out images",
        "eps_pred_mean": "mean of the predicted noise (ideal 0)",
        "eps_pred_std": "std of the predicted noise (ideal 1)",
        "err_mean": "mean of prediction minus truth", "err_std": "std of prediction minus truth",
        "vlb_bits": "L_{t-1} (t >= 2) or L_0 (t = 1) in bits/dim",
    },
    "probe": {
        "run_key": "run", "step": "training step of the probe", "bpd": "bits/dim bound",
        "prior_bits": "L_T in bits/dim", "l0_bits": "L_0 in bits/dim",
        "diffusion_bits": "sum of L_1..L_{T-1} in bits/dim",
        "heldout_loss": "held-out L_simple averaged over uniform t",
    },
    "drift": {
        "run_key": "run", "t": "reverse step: T..1, then 0 for the final sample",
        "mean": "mean pixel of x_t over samples", "std": "pixel std", "p01": "1st percentile",
        "p50": "median", "p99": "99th percentile", "frac_out": "fraction of pixels outside [-1, 1]",
        "ref_mean": "the same statistics of q(x_t) from held-out data", "ref_std": "",
        "ref_frac_out": "",
    },
    "drift_hist": {
        "run_key": "run", "t": "reverse step", "bin_lo": "bin lower edge", "bin_hi": "bin upper edge",
        "count": "sampled pixels in the bin", "ref_count": "q(x_t) pixels in the bin",
    },
    "quality": {
        "run_key": "run", "bpd": "bits/dim bound L_T + sum L_t + L_0", "prior_bits": "L_T",
        "l0_bits": "L_0", "fd": "Frechet distance (digit-classifier features; pixels otherwise)",
        "coverage": "fraction of digit classes produced", "final_mean_gap": "sample mean - data mean",
        "max_mean_gap": "largest |mean gap| along the chain",
        "hist_w1": "Wasserstein-1 of final pixel values vs held-out data",
        "sat_frac": "fraction of sample pixels with |x| >= 0.99",
        "ref_sat_frac": "the same fraction for the data (training images)",
        "bf16_autocast": "1.0 if the run trained and sampled under bf16 autocast (train.precision)",
    },
}
TABLES = list(TABLE_COLUMNS)


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
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(arrow, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_table(results: Path, study: str, table: str) -> pd.DataFrame:
    """All runs' rows of ``table`` as one DataFrame (empty if none were written)."""
    folder = Path(results) / study / table
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:
        return pd.DataFrame()
    dataset = ds.dataset([str(f) for f in files], format="parquet", schema=_unified_schema(files))
    return dataset.to_table().to_pandas()


def run_statuses(results: Path, study: str) -> dict[str, dict]:
    """run key -> its latest `runs` row (status, error, mlflow_run_id, ...)."""
    frame = read_table(results, study, "runs")
    if frame.empty:
        return {}
    return {row["run_key"]: row for row in frame.to_dict("records")}


def _unified_schema(files: list[Path]) -> pa.Schema:
    """Runs of one study may differ in optional columns (e.g. a failed run's empty table);
    the dataset reads them all under the union of their schemas."""
    return pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
