"""A study's report: Parquet tables -> pandas -> seaborn/matplotlib figures -> one static page.

``build_report(study, results_root, reports_root)`` writes ``reports_root/<study>/index.html``
with its figure PNGs and copied sample grids beside it. The page opens from disk with no
network. Statistics live in ``harness.stats``; HTML lives in ``templates/report.html.j2``.

Only runs whose ``runs`` row says ``finished`` feed metrics and figures; every other run is
shown with its status. A figure without data is replaced by a note, never an exception.

The Findings section tests the seed's three observations (``harness.findings``). Effects are
per-seed PAIRED differences against the baseline with their 95% Student-t CI (df = n - 1);
only an effect whose CI excludes zero gets a verdict other than "no clear effect", and the
metrics table's star goes only to an arm that is clearly best (``stats.clear_best_arms``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

import matplotlib

matplotlib.use("Agg")

import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from . import findings as findings_mod  # noqa: E402
from . import stats  # noqa: E402
from .stats import HIGHER, LOWER  # noqa: E402
from .tables import read_table  # noqa: E402

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
DPI = 110
FIG_WIDTH = 10.5  # inches: about 1150 px at DPI, for a ~1200 px page
FINISHED = "finished"
STATUS_ORDER = ["finished", "running", "interrupted", "failed", "pending", "not started"]


class Metric(NamedTuple):
    label: str
    group: str
    direction: str | None  # LOWER / HIGHER is better; None: a cost with no "better"
    absolute: bool = False  # compare |value| (signed gaps: closer to zero is better)


# The one table of metrics and of which way each is better (column of the `quality` table).
METRICS: dict[str, Metric] = {
    "final_loss": Metric("final train loss", "Loss and bound", LOWER),
    "heldout_loss": Metric("held-out loss", "Loss and bound", LOWER),
    "bpd": Metric("bits/dim", "Loss and bound", LOWER),
    "prior_bits": Metric("prior L_T (bits/dim)", "Loss and bound", LOWER),
    "final_mean_gap": Metric("|final mean gap|", "Sample drift", LOWER, absolute=True),
    "max_mean_gap": Metric("max |mean gap|", "Sample drift", LOWER, absolute=True),
    "hist_w1": Metric("histogram W1", "Sample drift", LOWER),
    "sat_frac": Metric("saturated fraction", "Sample drift", LOWER),
    "fd": Metric("Fréchet distance", "Sample quality", LOWER),
    "coverage": Metric("class coverage", "Sample quality", HIGHER),
    "params": Metric("parameters", "Cost", None),
    "seconds": Metric("seconds", "Cost", LOWER),
    "images_per_s": Metric("images/s", "Cost", HIGHER),
}

CI_STATEMENT = "mean ± half-width of the 95% Student-t CI over n seeds"


# --------------------------------------------------------------------------------------
# Loading


@dataclass
class StudyData:
    """Everything the page shows, read once from ``results/<study>``."""

    manifest: dict
    arms: list[str]  # display order: study.json first, then arms only seen in `runs`
    runs: pd.DataFrame  # one row per (arm, seed): arm, seed, run_key, status, error, ...
    tables: dict[str, pd.DataFrame]  # finished runs only, with arm and seed joined
    samples_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.manifest.get("seeds") or []]

    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == FINISHED]

    def finished_in_seed_order(self, arm: str) -> list[tuple[int, str]]:
        """(seed, run key) of the arm's finished runs, seeds in study.json order."""
        finished = self.finished()
        rows = finished[finished["arm"] == arm]
        order = self.seeds

        def rank(seed: int) -> tuple[int, int]:
            return (order.index(seed), seed) if seed in order else (len(order), seed)

        return sorted(((int(s), k) for s, k in zip(rows["seed"], rows["run_key"])), key=lambda p: rank(p[0]))

    def first_seed_keys(self, table: str) -> dict[str, tuple[int, str]]:
        """arm -> (seed, run key) of its first seed (study.json order) with rows in ``table``."""
        frame = self.tables.get(table, pd.DataFrame())
        present = set(frame["run_key"]) if "run_key" in frame else set()
        chosen: dict[str, tuple[int, str]] = {}
        for arm in self.arms:
            for seed, key in self.finished_in_seed_order(arm):
                if key in present:
                    chosen[arm] = (seed, key)
                    break
        return chosen


def _read_manifest(path: Path, notes: list[str]) -> dict:
    if not path.exists():
        notes.append(f"{path.name} is missing: the design below is inferred from the runs table.")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}); the design is inferred from the runs table.")
        return {}


def _read(results: Path, study: str, table: str, notes: list[str]) -> pd.DataFrame:
    """A whole table; if the dataset cannot be read as one, read file by file, skip bad files."""
    try:
        return read_table(results, study, table)
    except Exception as exc:  # noqa: BLE001 - one bad file must not lose the whole report
        log.warning("reading table %s as a dataset failed: %s", table, exc)
    frames = []
    for path in sorted((results / study / table).glob("*.parquet")):
        try:
            frames.append(pq.read_table(path).to_pandas())
        except Exception as exc:  # noqa: BLE001
            notes.append(f"Unreadable file skipped: {table}/{path.name} ({type(exc).__name__}).")
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _select_runs(runs: pd.DataFrame, manifest: dict, notes: list[str]) -> pd.DataFrame:
    """One row per (arm, seed). With the planned run keys of study.json, rows of other keys
    are stale (an earlier version of the study) and planned keys without a row are pending;
    without them, the finished row, else the latest one, of each (arm, seed) is kept."""
    columns = ["run_key", "arm", "seed", "status", "error", "mlflow_run_id", "seconds", "params", "updated", "config_json"]
    runs = runs.copy()
    for column in columns:
        if column not in runs:
            runs[column] = np.nan if column in ("seconds", "params") else ""
    runs = runs[runs["arm"].notna() & runs["seed"].notna()].copy()
    runs["seed"] = runs["seed"].astype(int)
    runs["status"] = runs["status"].fillna("").astype(str).replace("", "unknown")
    for column in ("error", "mlflow_run_id", "updated", "config_json"):
        runs[column] = runs[column].fillna("").astype(str)

    planned = manifest.get("runs")
    if planned:
        plan = pd.DataFrame(planned)[["run_key", "arm", "seed"]]
        plan["seed"] = plan["seed"].astype(int)
        stale = int((~runs["run_key"].isin(plan["run_key"])).sum())
        if stale:
            notes.append(f"{stale} run(s) from an earlier version of this study are not shown (their run keys are not planned any more).")
        known = runs.drop(columns=["arm", "seed"]).drop_duplicates("run_key", keep="last")
        merged = plan.merge(known, on="run_key", how="left")
        merged["status"] = merged["status"].fillna("pending")
        for column in ("error", "mlflow_run_id", "updated", "config_json"):
            merged[column] = merged[column].fillna("")
        return merged[columns].reset_index(drop=True)

    rank = runs["status"].map(lambda s: 0 if s == FINISHED else 1)
    runs = runs.assign(_rank=rank).sort_values(["_rank", "updated"], ascending=[True, False])
    dupes = int(runs.duplicated(["arm", "seed"]).sum())
    if dupes:
        notes.append(f"{dupes} older run(s) of an arm and seed already shown are ignored.")
    return runs.drop_duplicates(["arm", "seed"]).drop(columns="_rank")[columns].reset_index(drop=True)


def load_study(study: str, results_root: Path) -> StudyData:
    results_root = Path(results_root)
    notes: list[str] = []
    manifest = _read_manifest(results_root / study / "study.json", notes)
    raw_runs = _read(results_root, study, "runs", notes)
    runs = _select_runs(raw_runs, manifest, notes)

    arms = [a["arm"] for a in manifest.get("arms") or []]
    extra = [a for a in dict.fromkeys(runs["arm"]) if a not in arms]
    if extra and arms:
        notes.append(f"Arms not in study.json (shown last): {', '.join(map(str, extra))}.")
    arms += extra
    if not manifest:
        manifest = {"study": study, "question": "", "design": "unknown", "axes": {}, "baseline": None,
                    "baseline_arm": None, "seeds": sorted(set(runs["seed"])), "arms": [{"arm": a, "levels": {}, "overrides": {}} for a in arms]}
    manifest.setdefault("study", study)
    # every arm x seed of the design has a row, even before its run started
    present = set(zip(runs["arm"], runs["seed"]))
    missing = [{"arm": a, "seed": int(s), "run_key": "", "status": "not started"}
               for a in arms for s in manifest.get("seeds") or [] if (a, int(s)) not in present]
    if missing:
        runs = pd.concat([runs, pd.DataFrame(missing)], ignore_index=True)
        for column in ("error", "mlflow_run_id", "updated", "config_json"):
            runs[column] = runs[column].fillna("")
    arm_rank = {a: i for i, a in enumerate(arms)}
    runs = runs.assign(_a=runs["arm"].map(arm_rank)).sort_values(["_a", "seed"]).drop(columns="_a").reset_index(drop=True)

    finished = runs[runs["status"] == FINISHED][["run_key", "arm", "seed"]]
    tables = {}
    for table in ("train", "per_t", "probe", "drift", "drift_hist", "quality"):
        frame = _read(results_root, study, table, notes)
        if "run_key" in frame:
            frame = frame.drop(columns=[c for c in ("arm", "seed") if c in frame]).merge(finished, on="run_key")
        else:
            frame = pd.DataFrame(columns=["run_key", "arm", "seed"])
        tables[table] = frame
    return StudyData(manifest, arms, runs, tables, results_root / study / "samples", notes)


# --------------------------------------------------------------------------------------
# Numbers and tables


def fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_signed(x: float, digits: int = 3) -> str:
    text = fmt(x, digits)
    return text if text == "–" or text.startswith("-") else "+" + text


def metric_values(data: StudyData) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> arm -> seed -> value, over finished runs (|value| for absolute metrics).
    params and seconds fall back to the runs row when a quality row is missing."""
    quality = data.tables["quality"]
    finished = data.finished()
    out: dict[str, dict[str, dict[int, float]]] = {}
    for name, metric in METRICS.items():
        per_arm: dict[str, dict[int, float]] = {arm: {} for arm in data.arms}
        if name in quality:
            for arm, seed, value in zip(quality["arm"], quality["seed"], quality[name]):
                per_arm[arm][int(seed)] = _as_float(value, metric.absolute)
        if name in ("params", "seconds"):
            for arm, seed, value in zip(finished["arm"], finished["seed"], finished[name]):
                per_arm[arm].setdefault(int(seed), _as_float(value, metric.absolute))
        out[name] = per_arm
    return out


def _as_float(value: Any, absolute: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return abs(value) if absolute else value


def arm_status(data: StudyData, arm: str) -> tuple[list[str], str]:
    """(['2 finished', '1 failed'], css class of the worst status)."""
    counts = Counter(data.runs.loc[data.runs["arm"] == arm, "status"])
    if not counts:
        return ["no runs"], "st-pending"
    order = sorted(counts, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER))
    parts = [f"{counts[s]} {s}" for s in order]
    if set(counts) == {FINISHED}:
        css = FINISHED
    elif "failed" in counts:
        css = "failed"
    else:
        css = next(s for s in order if s != FINISHED)
    return parts, "st-" + css.replace(" ", "-")


def metrics_table(data: StudyData, values: dict) -> list[dict]:
    rows = []
    summaries = {name: {arm: stats.mean_ci(values[name][arm].values()) for arm in data.arms} for name in METRICS}
    # ★ only for an arm that is clearly best (paired CI against every other arm excludes zero
    # in its favour): a best mean whose lead lies inside its CI is not a win
    best = {name: stats.clear_best_arms(values[name], METRICS[name].direction) for name in METRICS}
    for arm in data.arms:
        n_finished = int((data.finished()["arm"] == arm).sum())
        status_text, status_class = arm_status(data, arm)
        cells = []
        for name in METRICS:
            mean, half, n = summaries[name][arm]
            if n_finished == 0:
                cells.append({"nodata": True, "text": "no data"})
                continue
            cells.append({
                "nodata": False,
                "text": fmt(mean),
                "half": fmt(half, 2) if n > 1 else "",
                "n_note": "not measured" if n == 0 else (f"n={n}" if n == 1 or n != n_finished else ""),
                "best": arm in best[name],
            })
        rows.append({"arm": arm, "status": status_text, "status_class": status_class, "n": n_finished,
                     "has_data": n_finished > 0, "cells": cells})
    return rows


def pick_baseline(data: StudyData) -> tuple[str | None, str]:
    """The baseline arm and how it was chosen."""
    manifest = data.manifest
    if manifest.get("baseline_arm") in data.arms:
        return manifest["baseline_arm"], "the study's baseline arm"
    baseline_levels = manifest.get("baseline")
    for arm in manifest.get("arms") or []:
        if baseline_levels and arm.get("levels") == baseline_levels:
            return arm["arm"], "the arm with the baseline levels"
    if data.arms:
        return data.arms[0], "no baseline was declared: the first arm is used"
    return None, "no arms"


def effects_table(data: StudyData, values: dict, baseline: str | None) -> list[dict]:
    rows = []
    if baseline is None:
        return rows
    for arm in data.arms:
        if arm == baseline:
            continue
        cells, pairs = [], 0
        for name, metric in METRICS.items():
            diff, half, n = stats.paired_effect(values[name][arm], values[name][baseline])
            word = stats.verdict(diff, half, n, metric.direction)
            pairs = max(pairs, n)
            excludes = stats.ci_excludes_zero(diff, half)
            cells.append({
                "text": fmt_signed(diff) if n else "",
                "half": fmt(half, 2) if n > 1 else "",
                "n": n,
                "verdict": word,
                "excludes_zero": excludes,
                "title": (f"95% CI {fmt(diff - half)} to {fmt(diff + half)} over {n} pairs: "
                          + ("excludes 0" if excludes else "includes 0")) if n > 1 else "",
                "class": {"better": "eff-better", "worse": "eff-worse", "higher": "eff-sig", "lower": "eff-sig"}.get(word, "eff-none"),
            })
        for cell in cells:  # a metric with fewer pairs than the row's says so
            cell["n_note"] = f"n={cell['n']}" if 0 < cell["n"] < pairs else ""
        rows.append({"arm": arm, "pairs": pairs, "cells": cells})
    return rows


def _estimate_cell(est: findings_mod.Estimate, signed: bool) -> dict:
    show = fmt_signed if signed else fmt
    return {"nodata": est.n == 0, "text": show(est.mean) if est.n else "–",
            "half": fmt(est.half, 2) if est.has_interval else "",
            "ci": f"CI {fmt(est.lo)} to {fmt(est.hi)}" if est.has_interval else (f"n={est.n}" if est.n == 1 else "")}


def findings_context(data: StudyData, baseline: str | None) -> dict:
    """The Findings section: F1-F3 of ``harness.findings`` as template rows. A failure here
    is shown on the page instead of breaking it."""
    try:
        found = findings_mod.compute_findings(data.runs, data.tables["per_t"], data.tables["quality"],
                                              arms=data.arms, baseline=baseline)
    except Exception as exc:  # noqa: BLE001 - a broken finding must not break the page
        log.exception("findings failed")
        return {"error": f"The findings could not be computed ({type(exc).__name__}: {exc}).", "entries": []}
    items = []
    for finding in found:
        rows = []
        for arm in finding.arms:
            cells = []
            for column in finding.columns:
                if column.kind == "t":
                    cells.append({"kind": "t", "text": arm.t_used.get(column.key) or "–"})
                elif column.kind == "shown":
                    cells.append({"kind": "shown", **_estimate_cell(arm.shown[column.key], column.signed)})
                else:
                    check = arm.checks[column.key]
                    cells.append({"kind": "check", **_estimate_cell(check.estimate, column.signed),
                                  "status": check.status, "word": check.word,
                                  "class": "fnd-" + check.status.replace(" ", "-")})
            rows.append({"arm": arm.arm, "baseline": arm.arm == finding.baseline, "n": arm.n_runs,
                         "status": arm.status, "class": "fnd-" + arm.status.replace(" ", "-"), "cells": cells})
        items.append({"key": finding.key, "anchor": "finding-" + finding.key.lower(), "title": finding.title,
                      "definition": finding.definition, "sentence": finding.sentence,
                      "columns": [{"label": c.label, "check": c.kind == "check"} for c in finding.columns],
                      "rows": rows, "has_data": finding.n_with_data > 0})
    return {"error": "", "entries": items}


def metric_columns() -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for name, metric in METRICS.items():
        arrow = {LOWER: "↓", HIGHER: "↑"}.get(metric.direction, "")
        groups.setdefault(metric.group, []).append({"key": name, "label": metric.label, "arrow": arrow})
    return [{"group": g, "metrics": ms} for g, ms in groups.items()]


# --------------------------------------------------------------------------------------
# Figures: each returns a Figure, or None when there is nothing to draw.


def arm_palette(arms: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("colorblind" if len(arms) <= 10 else "husl", max(len(arms), 1))
    return dict(zip(arms, colours))


def _arms_with(frame: pd.DataFrame, arms: list[str], column: str | None = None) -> list[str]:
    if frame.empty or "arm" not in frame or (column is not None and column not in frame):
        return []
    have = frame if column is None else frame[frame[column].notna()]
    present = set(have["arm"])
    return [a for a in arms if a in present]


def _final_probe(per_t: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last probe step."""
    if per_t.empty or "step" not in per_t:
        return per_t
    last = per_t.groupby("run_key")["step"].transform("max")
    return per_t[per_t["step"] == last]


def _band(ax, frame: pd.DataFrame, x: str, y: str, arms: list[str], palette: dict, *,
          positive: bool = False, label_seeds: bool = True) -> bool:
    """Per arm: the mean over seeds as a line, the min..max over seeds as a band."""
    drew = False
    for arm in arms:
        rows = frame[(frame["arm"] == arm) & frame[y].notna()]
        if positive:
            rows = rows[rows[y] > 0]
        if rows.empty:
            continue
        g = rows.groupby(x)[y].agg(["mean", "min", "max"]).sort_index()
        seeds = rows["seed"].nunique()
        label = f"{arm} ({seeds} seed{'s' if seeds != 1 else ''})" if label_seeds else arm
        ax.plot(g.index, g["mean"], color=palette[arm], label=label, lw=1.6)
        if seeds > 1:
            ax.fill_between(g.index, g["min"], g["max"], color=palette[arm], alpha=0.2, lw=0)
        drew = True
    return drew


def _readable_log_axes(*axes) -> None:
    """Plain numbers (0.1, 2, 50) instead of 10^k on log and symlog axes."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes:
        if not ax.has_data():
            continue
        for axis, scale, limits in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale == "symlog":
                axis.set_major_formatter(plain)
            if scale != "log":
                continue
            low, high = sorted(limits)
            span = high / low if low > 0 else math.inf
            if span < 3:  # a narrow range: label every minor tick
                axis.set_minor_formatter(plain)
            elif span < 10:  # under a decade: label the minor ticks 2, 3 and 5 (x 10^k)
                axis.set_minor_formatter(FuncFormatter(
                    lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 3, 5) else ""))
            elif span < 1000:
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_minor_formatter(NullFormatter())
            else:
                axis.set_minor_formatter(NullFormatter())
            axis.set_major_formatter(plain)
            ax.tick_params(axis="x" if axis is ax.xaxis else "y", which="minor", labelsize=7)


def fig_per_t_loss(data: StudyData, palette: dict):
    frame = _final_probe(data.tables["per_t"])
    arms = _arms_with(frame, data.arms, "loss_mse")
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 3.8))
    _band(ax, frame, "t", "loss_mse", arms, palette, positive=True)
    ax.set(xscale="log", yscale="log", xlabel="t (log scale)", ylabel="per-dimension MSE of predicted noise",
           title="Held-out noise-prediction loss per t (final probe)")
    ax.legend(fontsize=8, ncol=2)
    return fig


def fig_per_t_bias(data: StudyData, palette: dict):
    frame = _final_probe(data.tables["per_t"])
    arms = _arms_with(frame, data.arms, "eps_pred_mean")
    if not arms:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIG_WIDTH, 4.0), sharex=True)
    _band(left, frame, "t", "eps_pred_mean", arms, palette)
    left.axhline(0, color="0.3", ls="--", lw=1, label="ideal 0")
    left.set(xscale="log", xlabel="t (log scale)", ylabel="mean of predicted noise", title="Predicted-noise mean (ideal 0)")
    if "eps_pred_std" in frame:
        _band(right, frame, "t", "eps_pred_std", arms, palette)
    right.axhline(1, color="0.3", ls="--", lw=1, label="ideal 1")
    right.set(xscale="log", xlabel="t (log scale)", ylabel="std of predicted noise", title="Predicted-noise std (ideal 1)")
    left.legend(fontsize=8)
    return fig


def fig_vlb(data: StudyData, palette: dict):
    frame = _final_probe(data.tables["per_t"])
    quality = data.tables["quality"]
    vlb_arms = _arms_with(frame, data.arms, "vlb_bits")
    wt_arms = _arms_with(frame, data.arms, "wt")
    prior_arms = _arms_with(quality, data.arms, "prior_bits")
    if not (vlb_arms or wt_arms or prior_arms):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(FIG_WIDTH, 4.0), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    vlb_ax, wt_ax, prior_ax = axes
    if vlb_arms:
        _band(vlb_ax, frame, "t", "vlb_bits", vlb_arms, palette, positive=True)
        vlb_ax.legend(fontsize=7)
    vlb_ax.set(xscale="log", yscale="log", xlabel="t (log scale)", ylabel="bits/dim",
               title="VLB term per t (t=1: L_0)")
    if wt_arms:
        _band(wt_ax, frame, "t", "wt", wt_arms, palette, positive=True, label_seeds=False)
    wt_ax.set(xscale="log", yscale="log", xlabel="t (log scale)", ylabel="w_t", title="DDPM weight w_t (eq. 12)")
    if prior_arms:
        rows = quality[quality["prior_bits"].notna()]
        means = [rows.loc[rows["arm"] == a, "prior_bits"].mean() for a in prior_arms]
        positions = np.arange(len(prior_arms))
        prior_ax.bar(positions, means, color=[palette[a] for a in prior_arms], alpha=0.85)
        for i, arm in enumerate(prior_arms):
            seeds = rows.loc[rows["arm"] == arm, "prior_bits"]
            prior_ax.scatter(np.full(len(seeds), i), seeds, color="0.15", s=10, zorder=3)
            prior_ax.annotate(fmt(means[i]), (i, means[i]), ha="center", va="bottom", fontsize=8,
                              xytext=(0, 2), textcoords="offset points")
        prior_ax.set_xticks(positions, prior_arms, rotation=30, ha="right", fontsize=8)
        prior_ax.margins(y=0.25)
    prior_ax.set(ylabel="L_T (bits/dim)", title="Prior term L_T per arm")
    prior_ax.set_xlabel("large L_T: x_T is not N(0, I),\nthe chain never reaches noise", fontsize=8, color="0.25")
    fig.tight_layout()
    return fig


def fig_drift_curves(data: StudyData, palette: dict):
    drift = data.tables["drift"]
    chosen = data.first_seed_keys("drift")
    if not chosen or "mean" not in drift:
        return None
    panels = [("mean", "ref_mean", "mean of x_t"), ("std", "ref_std", "std of x_t"),
              ("frac_out", "ref_frac_out", "fraction of pixels outside [-1, 1]")]
    fig, axes = plt.subplots(1, 3, figsize=(FIG_WIDTH, 4.0), sharex=True)
    for ax, (col, ref, ylabel) in zip(axes, panels):
        for arm, (seed, key) in chosen.items():
            rows = drift[drift["run_key"] == key].sort_values("t")
            if col in rows:
                ax.plot(rows["t"], rows[col], color=palette[arm], lw=1.6, label=f"{arm} (seed {seed})")
            if ref in rows:
                ax.plot(rows["t"], rows[ref], color=palette[arm], lw=1.2, ls="--")
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlabel="t (symlog; sampling runs left to right)", ylabel=ylabel)
        ax.invert_xaxis()
    axes[0].set_title("x_t mean")
    axes[1].set_title("x_t std")
    axes[2].set_title("outside [-1, 1]")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", ls="--"))
    labels.append("reference q(x_t) (dashed)")
    axes[0].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


def fig_drift_hist(data: StudyData, palette: dict):
    hist = data.tables["drift_hist"]
    chosen = data.first_seed_keys("drift_hist")
    if not chosen or "count" not in hist:
        return None
    arms = list(chosen)
    fig, axes = plt.subplots(len(arms), 2, figsize=(FIG_WIDTH, 1.0 + 2.1 * len(arms)), squeeze=False,
                             sharex=True)
    grids = {}
    for arm in arms:
        rows = hist[hist["run_key"] == chosen[arm][1]]
        for column in ("count", "ref_count"):
            if column in rows:
                grid = rows.pivot_table(index="t", columns="bin_lo", values=column, aggfunc="sum").sort_index(ascending=False)
                grids[arm, column] = (grid, grid.to_numpy(float) / np.maximum(grid.to_numpy(float).sum(axis=1, keepdims=True), 1))
    vmax = max((float(np.nanmax(f)) for _, f in grids.values() if f.size), default=1.0) or 1.0
    images = []
    for row, arm in enumerate(arms):
        seed, key = chosen[arm]
        rows = hist[hist["run_key"] == key]
        for col, (column, what) in enumerate((("count", "sampled"), ("ref_count", "reference q(x_t)"))):
            ax = axes[row][col]
            if (arm, column) not in grids:
                ax.set_axis_off()
                continue
            grid, fractions = grids[arm, column]
            edges = np.append(grid.columns.to_numpy(float), rows["bin_hi"].max())
            image = ax.pcolormesh(edges, np.arange(len(grid.index) + 1), fractions, cmap="magma",
                                  norm=PowerNorm(0.4, vmin=0, vmax=vmax), shading="flat")
            images.append(image)
            every = max(1, -(-len(grid.index) // 8))  # at most about 8 labelled rows
            ticks = np.arange(0, len(grid.index), every)
            ax.set_yticks(ticks + 0.5, [str(grid.index[i]) for i in ticks], fontsize=7)
            ax.invert_yaxis()
            ax.set_ylim(len(grid.index), 0)
            for edge in (-1, 1):
                ax.axvline(edge, color="white", ls=":", lw=0.8)
            ax.set_title(f"{arm}: {what} (seed {seed})", fontsize=9, color=palette[arm] if col == 0 else "0.2")
            ax.set_ylabel("t" if col == 0 else "")
            ax.grid(False)
    for ax in axes[-1]:
        ax.set_xlabel("pixel value")
    fig.tight_layout()
    if images:
        fig.colorbar(images[0], ax=axes, fraction=0.025, pad=0.01, label="fraction of pixels at t")
    return fig


def fig_training(data: StudyData, palette: dict):
    train, probe = data.tables["train"], data.tables["probe"]
    train_arms = _arms_with(train, data.arms, "loss")
    probe_arms = _arms_with(probe, data.arms, "heldout_loss")
    if not (train_arms or probe_arms):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIG_WIDTH, 4.0))
    if train_arms:
        _band(left, train, "step", "loss", train_arms, palette, positive=True)
        left.legend(fontsize=8)
    left.set(yscale="log", xlabel="training step", ylabel="loss", title="Training loss (mean since last log)")
    if probe_arms:
        _band(right, probe, "step", "heldout_loss", probe_arms, palette, positive=True)
        right.legend(fontsize=8)
    right.set(yscale="log", xlabel="training step", title="Held-out loss at each probe")
    return fig


@dataclass
class FigureSpec:
    name: str
    build: Callable
    alt: str
    caption: str
    empty: str


FIGURES: list[FigureSpec] = [
    FigureSpec("per_t_loss", fig_per_t_loss, "per-t loss per arm",
               "Line: mean over seeds; band: min to max over seeds. Final probe of each run; t on a log scale, loss on a log scale.",
               "No per-t probe data: no arm has a finished run with a per_t table."),
    FigureSpec("per_t_bias", fig_per_t_bias, "per-t predicted noise mean and std per arm",
               "A well-trained model predicts noise with mean 0 and std 1 (dashed reference lines) at every t. "
               "Line: mean over seeds; band: min to max over seeds; t on a log scale.",
               "No per-t probe data: no arm has a finished run with a per_t table."),
    FigureSpec("vlb", fig_vlb, "VLB per t, w_t and prior L_T per arm",
               "Left: L_{t-1} in bits/dim (t=1 shows L_0), log scales. Middle: the DDPM weight w_t that L_simple drops. "
               "Right: the prior term L_T per arm (bar: mean over seeds, dots: seeds). "
               "A large L_T means the forward chain never reaches N(0, I): sampling starts from noise the model never saw.",
               "No VLB data: no arm has a finished run with per_t or quality rows."),
    FigureSpec("drift_curves", fig_drift_curves, "sample drift along the reverse chain per arm",
               "Statistics of x_t while sampling (solid) against q(x_t) from held-out data (dashed, same colour). "
               "First seed of each arm (the first with a finished run; seed in the legend). t on a symmetric-log axis (linear below 1, so the final sample t=0 shows), "
               "reversed so that sampling runs left to right. The gap between solid and dashed is the drift.",
               "No drift data: no arm has a finished run with a drift table."),
    FigureSpec("drift_hist", fig_drift_hist, "pixel-value histograms over t, sampled vs reference, per arm",
               "Fraction of pixels in each value bin at each recorded t (rows, sampling runs top to bottom), "
               "sampled (left) and q(x_t) from held-out data (right); dotted lines at -1 and 1. First finished seed of each arm (seed in each title); "
               "colour on a power scale so that thin tails show.",
               "No drift histograms: no arm has a finished run with a drift_hist table."),
    FigureSpec("training", fig_training, "training and held-out loss curves per arm",
               "Left: training loss logged during training. Right: held-out L_simple (uniform t) at each probe. "
               "Line: mean over seeds; band: min to max over seeds; log y.",
               "No training curves: no arm has a finished run with a train or probe table."),
]


def render_figure(spec: FigureSpec, data: StudyData, palette: dict, out_dir: Path) -> dict:
    entry = {"name": spec.name, "alt": spec.alt, "caption": spec.caption, "src": None, "note": None}
    path = out_dir / f"{spec.name}.png"
    path.unlink(missing_ok=True)  # never leave a previous build's figure beside this page
    try:
        with sns.axes_style("whitegrid"):
            fig = spec.build(data, palette)
            if fig is None:
                entry["note"] = spec.empty
                return entry
            _readable_log_axes(*fig.axes)
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
        entry["src"] = path.name
    except Exception as exc:  # noqa: BLE001 - a broken figure must not break the page
        log.exception("figure %s failed", spec.name)
        entry["note"] = f"This figure could not be drawn ({type(exc).__name__}: {exc})."
    finally:
        plt.close("all")
    return entry


# --------------------------------------------------------------------------------------
# Samples, runs, design


def sample_grids(data: StudyData, out_dir: Path) -> tuple[list[dict], str]:
    for old in out_dir.glob("samples_*.png"):
        old.unlink()
    grids = []
    finished = data.finished()
    for arm in data.arms:
        entry = {"arm": arm, "seed": None, "src": None, "note": ""}
        for seed, key in data.finished_in_seed_order(arm):
            source = data.samples_dir / f"{key}.png"
            if source.exists():
                target = out_dir / f"samples_{_safe(key)}.png"
                shutil.copyfile(source, target)
                entry.update(seed=seed, src=target.name)
                break
        if entry["src"] is None:
            entry["note"] = "no sample grid (" + ", ".join(arm_status(data, arm)[0]) + ")"
        grids.append(entry)
    sample_seeds = set()
    for text in finished["config_json"]:
        try:
            sample_seeds.add(json.loads(text)["sample"]["seed"])
        except (ValueError, KeyError, TypeError):
            pass
    if len(sample_seeds) == 1:
        note = f"All arms sample from the same x_T and noise (sample.seed = {sample_seeds.pop()})."
    elif sample_seeds:
        note = "Warning: arms use different sample seeds, so their x_T differ: " + ", ".join(map(str, sorted(sample_seeds))) + "."
    else:
        note = "All arms sample from the same x_T unless the study overrides sample.seed."
    return grids, note


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def run_rows(data: StudyData) -> list[dict]:
    rows = []
    for r in data.runs.itertuples(index=False):
        seconds = float(r.seconds) if r.seconds is not None and not pd.isna(r.seconds) else math.nan
        rows.append({"arm": r.arm, "seed": int(r.seed), "run_key": r.run_key or "–", "status": r.status,
                     "status_class": "st-" + str(r.status).replace(" ", "-"),
                     "mlflow_run_id": r.mlflow_run_id or "–", "seconds": fmt(seconds),
                     "error": r.error if r.status != FINISHED else ""})
    return rows


def design_context(data: StudyData, baseline: str | None, baseline_how: str) -> dict:
    manifest = data.manifest
    base_levels = manifest.get("baseline") or {}
    axes = [{"axis": axis, "levels": [{"name": str(level), "baseline": base_levels.get(axis) == level} for level in levels]}
            for axis, levels in (manifest.get("axes") or {}).items()]
    arms = []
    by_name = {a["arm"]: a for a in manifest.get("arms") or []}
    for arm in data.arms:
        spec = by_name.get(arm, {})
        text, css = arm_status(data, arm)
        arms.append({
            "arm": arm, "baseline": arm == baseline,
            "levels": [f"{k}={v}" for k, v in (spec.get("levels") or {}).items()],
            "overrides": [f"{k} = {json.dumps(v)}" for k, v in (spec.get("overrides") or {}).items()],
            "status": text, "status_class": css,
        })
    return {"name": manifest.get("study"), "question": manifest.get("question") or "(no question recorded)",
            "design": manifest.get("design") or "unknown", "axes": axes, "arms": arms,
            "seeds": data.seeds, "baseline": baseline, "baseline_how": baseline_how}


# --------------------------------------------------------------------------------------


def tuning_context(data: StudyData, results_root: Path, notes: list[str]) -> list[dict]:
    """Each arm's search (the `tuning` table): trials, the best value per tuned key."""
    frame = _read(Path(results_root), data.manifest.get("study", ""), "tuning", notes)
    if frame.empty:
        return []
    rows = []
    for arm in [a for a in data.arms if a in set(frame["arm"])] + sorted(set(frame["arm"]) - set(data.arms)):
        trials = frame[frame["arm"] == arm]
        best = trials[trials["best"]]
        params = {c[len("param."):]: best[c].iloc[0] for c in trials.columns if c.startswith("param.") and len(best)}
        states = trials["state"].value_counts().to_dict()
        rows.append({
            "arm": arm,
            "metric": str(trials["metric"].iloc[0]),
            "best_value": fmt(float(best["value"].iloc[0])) if len(best) else "–",
            "best_params": [f"{k} = {fmt(v) if isinstance(v, float) else v}" for k, v in params.items()],
            "trials": ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
        })
    return rows


def budget_statement(data: StudyData) -> str:
    """How training budgets compare across arms (train.budget_by of the finished runs)."""
    budgets = set()
    for text in data.runs.get("config_json", pd.Series(dtype=str)).dropna():
        if not text:
            continue
        train = json.loads(text).get("train", {})
        kind = train.get("budget_by", "steps")
        amount = {"steps": train.get("steps"), "images": train.get("budget_images"),
                  "seconds": train.get("budget_seconds")}[kind]
        budgets.add((kind, amount))
    if not budgets:
        return "unknown (no run has started)"
    kinds = {k for k, _ in budgets}
    parts = ", ".join(f"{amount} {kind}" for kind, amount in sorted(budgets, key=str))
    if len(kinds) == 1:
        kind = next(iter(kinds))
        held = {"steps": "equal optimizer steps", "images": "equal images seen",
                "seconds": "equal training wall-clock time"}[kind]
        return f"arms are compared at {held} ({parts})"
    return f"arms mix budget kinds ({parts}); compare with care"


def build_report(study: str, results_root: Path, reports_root: Path) -> Path:
    """Write ``reports_root/<study>/index.html`` and its images; return the index path.

    Raises FileNotFoundError when ``results_root/<study>`` does not exist (a mistyped study);
    anything missing inside it (failed or running runs, absent tables) is shown on the page.
    """
    if not (Path(results_root) / study).is_dir():
        raise FileNotFoundError(f"no results for study {study!r} under {results_root}")
    data = load_study(study, Path(results_root))
    out_dir = Path(reports_root) / study
    out_dir.mkdir(parents=True, exist_ok=True)

    values = metric_values(data)
    baseline, baseline_how = pick_baseline(data)
    palette = arm_palette(data.arms)
    with plt.rc_context({"font.size": 9, "axes.titlesize": 10}):
        figures = {spec.name: render_figure(spec, data, palette, out_dir) for spec in FIGURES}
    grids, samples_note = sample_grids(data, out_dir)

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # the template is .html.j2, which select_autoescape would not match
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(
        study=design_context(data, baseline, baseline_how),
        ci_statement=CI_STATEMENT,
        metric_groups=metric_columns(),
        metric_rows=metrics_table(data, values),
        effect_rows=effects_table(data, values, baseline),
        findings=findings_context(data, baseline),
        tuning=tuning_context(data, results_root, data.notes),
        budget=budget_statement(data),
        figures=figures,
        samples=grids,
        samples_note=samples_note,
        runs=run_rows(data),
        notes=data.notes,
        built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        results_dir=str(Path(results_root) / study),
        no_clear_effect=stats.NO_CLEAR_EFFECT,
    )
    index = out_dir / "index.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(html)
    os.chmod(tmp, 0o644)
    os.replace(tmp, index)
    return index
