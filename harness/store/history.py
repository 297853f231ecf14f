"""A run's metric history: the points its Parquet tables hold, as MLflow metrics, and which of
them MLflow was seen to hold. The tracker logs them while a run trains (harness.store.tracking);
a run rebuilt or completed from results/ gets the ones MLflow lacks (harness.store.rebuild).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow.entities import Metric

from ..study.plan import RunSpec

# Per-t curves of the final probe (step = t) and drift curves (step = reverse-chain index, 0 at
# x_T) as MLflow metrics, so that MLflow's chart view overlays them across runs.
CURVE_METRICS = {
    "per_t": ("per_t", ["loss_mse", "eps_pred_mean", "eps_pred_std", "vlb_bits", "loss_best_ref"]),
    "drift": ("drift", ["mean", "std", "frac_out", "ref_mean", "q_mean", "qstart_mean", "gauss_chain_mean"]),
}


METRIC_BATCH = 1000  # MLflow's limit per log_batch call


def curve_metrics(name: str, frame: pd.DataFrame, now: int) -> list[Metric]:
    if name not in CURVE_METRICS or frame.empty:
        return []
    prefix, columns = CURVE_METRICS[name]
    if name == "per_t":
        frame = frame[frame["step"] == frame["step"].max()]
        steps = frame["t"].astype(int).tolist()
    else:
        steps = list(range(len(frame)))  # rows run from t = T down to the final sample
    out = []
    for column in columns:
        if column in frame:
            out += [
                Metric(f"{prefix}/{column}", float(v), now, s) for v, s in zip(frame[column], steps) if np.isfinite(v)
            ]
    return out


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
