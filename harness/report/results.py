"""One results layer: what a study's tables say, read once, for every reader.

``StudyResults.load(results_root, study)`` reads ``results/<study>`` (study.json, the Parquet
tables) and answers what the report, the hypotheses, `harness status` and the tuner ask:
which runs count (the ledger's finished runs of the planned design, one per arm and seed),
each table restricted to them with arm and seed joined, the final probe, and any declared
per-run metric per arm and seed. A table that cannot be read as one dataset is read file by
file and unreadable files are named in ``notes``, never raised.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ddpm_engine.metrics import PER_RUN, per_t_summary

from ..runs.ledger import Ledger
from ..store.states import RunState

log = logging.getLogger(__name__)

FINISHED = str(RunState.FINISHED)

# Columns that older code wrote under another name, per table: old -> current. The meaning is
# unchanged (only the name said the opposite: the best reference's loss is an upper bound on
# the irreducible loss, not a floor; the "oracle" chain is a reference curve, the Gaussian
# denoiser's chain), so old tables read under the current names.
RENAMED_COLUMNS: dict[str, dict[str, str]] = {
    "per_t": {"loss_floor": "loss_best_ref", "floor_denoiser": "best_ref_denoiser"},
    "quality": {"floor_t_small": "best_ref_t_small", "frac_t_above_floor": "frac_t_above_best_ref"},
    "drift": {f"oracle_{s}": f"gauss_chain_{s}" for s in ("mean", "std", "frac_out")},
}
# Per-run metrics whose definition changed, not just their name: a row written by older code
# (it has the old name of ``marker``) has its value dropped, so ``StudyResults.per_run``
# derives it again from the run's final probe. shortfall_t_small was clipped at 0 then.
REDEFINED_COLUMNS: dict[str, dict[str, str]] = {"quality": {"shortfall_t_small": "floor_t_small"}}
NOT_STARTED = "not started"  # a (arm, seed) of the design with no run key yet (no study.json runs)


@dataclass
class StudyResults:
    study: str
    root: Path
    manifest: dict
    arms: list[str]  # display order: study.json first, then arms only seen in `runs`
    runs: pd.DataFrame  # one row per (arm, seed) of the design: run_key, status, error, ...
    notes: list[str] = field(default_factory=list)
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, results_root: Path, study: str) -> StudyResults:
        root = Path(results_root)
        notes: list[str] = []
        manifest = _read_manifest(root / study / "study.json", notes)
        ledger = _read_ledger(root, study, notes)
        stale = ledger.stale_keys(manifest)
        if stale:
            notes.append(
                f"{len(stale)} run(s) from an earlier version of this study are not shown "
                "(their run keys are not planned any more)."
            )
        runs = ledger.design_rows(manifest)
        notes += damaged_notes(root, study, runs)
        arms = [a["arm"] for a in manifest.get("arms") or []]
        extra = [a for a in dict.fromkeys(runs["arm"]) if a not in arms]
        if extra and arms:
            notes.append(f"Arms not in study.json (shown last): {', '.join(map(str, extra))}.")
        arms += extra
        if not manifest:
            manifest = {
                "study": study,
                "question": "",
                "design": "unknown",
                "axes": {},
                "baseline": None,
                "baseline_arm": None,
                "seeds": sorted(set(runs["seed"])),
                "arms": [{"arm": a, "levels": {}, "overrides": {}} for a in arms],
            }
        manifest.setdefault("study", study)
        present = set(zip(runs["arm"], runs["seed"]))
        missing = [
            {"arm": a, "seed": int(s), "run_key": "", "status": NOT_STARTED}
            for a in arms
            for s in manifest.get("seeds") or []
            if (a, int(s)) not in present
        ]
        if missing:
            runs = pd.concat([runs, pd.DataFrame(missing)], ignore_index=True)
            for column in ("error", "mlflow_run_id", "updated", "config_json"):
                runs[column] = runs[column].fillna("")
        rank = {a: i for i, a in enumerate(arms)}
        runs = (
            runs.assign(_a=runs["arm"].map(rank)).sort_values(["_a", "seed"]).drop(columns="_a").reset_index(drop=True)
        )
        return cls(study, root, manifest, arms, runs, notes)

    # ---------------------------------------------------------------- the design
    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.manifest.get("seeds") or []]

    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == FINISHED]

    def baseline(self) -> tuple[str | None, str]:
        """The baseline arm and how it was chosen."""
        manifest = self.manifest
        if manifest.get("baseline_arm") in self.arms:
            return manifest["baseline_arm"], "the study's baseline arm"
        levels = manifest.get("baseline")
        for arm in manifest.get("arms") or []:
            if levels and arm.get("levels") == levels:
                return arm["arm"], "the arm with the baseline levels"
        if self.arms:
            return self.arms[0], "no baseline was declared: the first arm is used"
        return None, "no arms"

    def finished_in_seed_order(self, arm: str) -> list[tuple[int, str]]:
        """(seed, run key) of the arm's finished runs, seeds in study.json order."""
        rows = self.finished()
        rows = rows[rows["arm"] == arm]
        order = self.seeds

        def rank(seed: int) -> tuple[int, int]:
            return (order.index(seed), seed) if seed in order else (len(order), seed)

        return sorted(((int(s), k) for s, k in zip(rows["seed"], rows["run_key"])), key=lambda p: rank(p[0]))

    def first_seed_keys(self, table: str) -> dict[str, tuple[int, str]]:
        """arm -> (seed, run key) of its first seed (study.json order) with rows in ``table``."""
        frame = self.table(table)
        present = set(frame["run_key"]) if "run_key" in frame else set()
        chosen: dict[str, tuple[int, str]] = {}
        for arm in self.arms:
            for seed, key in self.finished_in_seed_order(arm):
                if key in present:
                    chosen[arm] = (seed, key)
                    break
        return chosen

    # ---------------------------------------------------------------- tables
    def table(self, name: str) -> pd.DataFrame:
        """The rows of ``name`` that belong to finished runs, with their arm and seed."""
        if name not in self._tables:
            frame = read_table_tolerant(self.root, self.study, name, self.notes)
            finished = self.finished()[["run_key", "arm", "seed"]]
            if "run_key" in frame:
                frame = frame.drop(columns=[c for c in ("arm", "seed") if c in frame])
                frame = frame.assign(run_key=frame["run_key"].astype(str)).merge(finished, on="run_key")
            else:
                frame = pd.DataFrame(columns=["run_key", "arm", "seed"])
            self._tables[name] = frame
        return self._tables[name]

    def final_probe(self) -> pd.DataFrame:
        """per_t rows at each finished run's final probe step."""
        per_t = self.table("per_t")
        if per_t.empty or "step" not in per_t:
            return per_t
        return per_t[per_t["step"] == per_t.groupby("run_key")["step"].transform("max")]

    def per_run(self) -> pd.DataFrame:
        """One row per finished run: run_key, arm, seed and every declared per-run metric
        (NaN where not measured). Runs recorded before a metric was declared get the ones
        derivable from their final probe; params and seconds fall back to the runs row."""
        if "_per_run" in self._tables:
            return self._tables["_per_run"]
        finished = self.finished()[["run_key", "arm", "seed", "params", "seconds"]]
        quality = (
            self.table("quality").drop(columns=["arm", "seed"], errors="ignore").drop_duplicates("run_key", keep="last")
        )
        frame = finished.merge(quality, on="run_key", how="left", suffixes=("_runs", ""))
        for name in ("params", "seconds"):
            fallback = frame.pop(f"{name}_runs") if f"{name}_runs" in frame else None
            if fallback is not None:
                frame[name] = frame[name].fillna(fallback) if name in frame else fallback
        # per row, not per column: one study may hold runs of older code next to new ones
        derived = [n for n in per_t_summary(pd.DataFrame()) if n not in frame or frame[n].isna().any()]
        if derived:
            probe = self.final_probe()
            by_key = {key: per_t_summary(rows) for key, rows in probe.groupby("run_key")} if not probe.empty else {}
            for name in derived:
                again = pd.Series([by_key.get(k, {}).get(name, math.nan) for k in frame["run_key"]], index=frame.index)
                frame[name] = frame[name].fillna(again) if name in frame else again
        for name in PER_RUN:
            if name not in frame:
                frame[name] = math.nan
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
        frame = frame[["run_key", "arm", "seed", *PER_RUN]].reset_index(drop=True)
        self._tables["_per_run"] = frame
        return frame

    def metric(self, name: str) -> dict[str, dict[int, float]]:
        """arm -> seed -> value of a per-run metric, over finished runs (every arm present)."""
        frame = self.per_run()
        out: dict[str, dict[int, float]] = {arm: {} for arm in self.arms}
        for arm, seed, value in zip(frame["arm"], frame["seed"], frame[name]):
            out.setdefault(arm, {})[int(seed)] = float(value)
        return out


def damaged_notes(root: Path, study: str, runs: pd.DataFrame) -> list[str]:
    """One note per finished run with a missing or unreadable table (harness.runs.repair): the
    report shows it without them, so its verdicts count it only where it has the values."""
    from ..runs.repair import damaged_tables

    finished = runs[runs["status"] == FINISHED]
    damaged = damaged_tables(root, study, finished["run_key"].astype(str)) if not finished.empty else {}
    return [
        f"{', '.join(damaged[key])} of run {arm} seed {seed} ({key}) missing or unreadable, and not restored: "
        "the run is shown without them (`harness run` restores them from MLflow or measures the run again)."
        for key, arm, seed in zip(finished["run_key"], finished["arm"], finished["seed"])
        if key in damaged
    ]


def _read_manifest(path: Path, notes: list[str]) -> dict:
    if not path.exists():
        notes.append(f"{path.name} is missing: the design below is inferred from the runs table.")
        return {}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"it holds a JSON {type(manifest).__name__}, not an object")
        return manifest
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}); the design is inferred from the runs table.")
        return {}


def _read_ledger(root: Path, study: str, notes: list[str]) -> Ledger:
    frame = read_table_tolerant(root, study, "runs", notes)
    if frame.empty or "run_key" not in frame:
        return Ledger(root, study)
    frame = frame[frame["arm"].notna() & frame["seed"].notna()] if {"arm", "seed"} <= set(frame) else frame
    return Ledger(root, study, {str(r["run_key"]): r for r in frame.to_dict("records")})


def read_table_tolerant(root: Path, study: str, table: str, notes: list[str]) -> pd.DataFrame:
    """A whole table; if the dataset cannot be read as one, file by file, skipping (and
    naming) unreadable files: one bad file must not lose a whole report."""
    from ..store.tables import read_table

    try:
        quarantined: list[Path] = []
        frame = read_table(root, study, table, quarantined)
        notes += [f"Unreadable file set aside as {p.name}.corrupt: {table}/{p.name}." for p in quarantined]
        return current_names(table, frame)
    except Exception as exc:  # noqa: BLE001
        log.warning("reading table %s as a dataset failed: %s", table, exc)
    import pyarrow.parquet as pq

    frames = []
    for path in sorted((Path(root) / study / table).glob("*.parquet")):
        try:
            frames.append(pq.read_table(path).to_pandas())
        except Exception as exc:  # noqa: BLE001
            notes.append(f"Unreadable file skipped: {table}/{path.name} ({type(exc).__name__}).")
    return current_names(table, pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()


def current_names(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with old column names mapped to current ones (RENAMED_COLUMNS) and redefined
    values of old rows dropped (REDEFINED_COLUMNS). A table that holds old and new runs has
    both names (the union schema): each row keeps the one it was written with."""
    for column, marker in REDEFINED_COLUMNS.get(table, {}).items():
        if column in frame and marker in frame:
            frame = frame.assign(**{column: frame[column].where(frame[marker].isna())})
    for old, new in RENAMED_COLUMNS.get(table, {}).items():
        if old not in frame:
            continue
        old_values = frame.pop(old)
        frame[new] = frame[new].combine_first(old_values) if new in frame else old_values
    return frame
