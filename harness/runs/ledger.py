"""The ledger: the one place that decides a run key's state.

Three stores remember runs: the Parquet ``runs`` table of a study (this machine's record),
MLflow (one run per key) and, on the distributed path, the Optuna queue (trials per key).
Each speaks its own vocabulary; the functions below translate it into ``RunState`` and
``Ledger`` answers finished / failed / running / pending for `run`, `status`, the report,
the hypotheses, the worker, `enqueue` and `pull_from_mlflow` (docs/design.md, "Run states").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..store.states import RunState

if TYPE_CHECKING:
    import pandas as pd

    from ..study.plan import RunSpec

FINISHED, FAILED, RUNNING, PENDING, INTERRUPTED = (
    RunState.FINISHED,
    RunState.FAILED,
    RunState.RUNNING,
    RunState.PENDING,
    RunState.INTERRUPTED,
)

MLFLOW_STATES = {
    "FINISHED": FINISHED,
    "FAILED": FAILED,
    "RUNNING": RUNNING,
    "SCHEDULED": RUNNING,
    "KILLED": INTERRUPTED,
}
TRIAL_STATES = {"COMPLETE": FINISHED, "RUNNING": RUNNING, "WAITING": PENDING, "FAIL": FAILED, "PRUNED": FAILED}
# When one key has several records (trials, MLflow runs), the first state present here wins.
PRECEDENCE = (FINISHED, RUNNING, PENDING, INTERRUPTED, FAILED)


def from_mlflow(status: str) -> RunState:
    return MLFLOW_STATES.get(str(status).upper(), PENDING)


def from_trials(state_names: Iterable[str]) -> RunState:
    """A key's state from the states (names: COMPLETE, WAITING, ...) of its Optuna trials:
    any completed trial means finished; else a running one, else a waiting one; a key
    whose trials all failed is failed; none at all is pending (not enqueued)."""
    states = {TRIAL_STATES.get(name, PENDING) for name in state_names}
    return next((s for s in PRECEDENCE if s in states), PENDING)


def merged(*states: RunState) -> RunState:
    """One state from several stores' answers: finished anywhere is finished."""
    present = set(states)
    return next((s for s in PRECEDENCE if s in present), PENDING)


@dataclass
class Ledger:
    """The runs of one study as this machine's ``runs`` table records them."""

    results: Path
    study: str
    rows: dict[str, dict] = field(default_factory=dict)  # run key -> its latest `runs` row
    quarantined: list[Path] = field(default_factory=list)  # unreadable `runs` files set aside

    @classmethod
    def load(cls, results: Path, study: str) -> Ledger:
        """Read ``results/<study>/runs``; a study never run has no rows (and pays no pyarrow
        import: `harness run` starts its slots before that)."""
        results = Path(results)
        if not (results / study / "runs").exists():
            return cls(results, study)
        from ..store.tables import read_table

        quarantined: list[Path] = []
        frame = read_table(results, study, "runs", quarantined)
        rows = {} if frame.empty else {row["run_key"]: row for row in frame.to_dict("records")}
        return cls(results, study, rows, quarantined)

    def state(self, key: str) -> RunState:
        row = self.rows.get(key)
        return RunState.parse(row.get("status")) if row else PENDING

    def row(self, key: str) -> dict:
        return self.rows.get(key, {})

    def is_finished(self, key: str) -> bool:
        return self.state(key) is FINISHED

    @staticmethod
    def row_is_finished(row: dict) -> bool:
        return RunState.parse(row.get("status")) is FINISHED

    def measure_version(self, key: str) -> int:
        """The MEASURE_VERSION its tables were made under; rows written before the version
        was recorded are version 1."""
        value = _number(self.row(key).get("measure_version"))
        return int(value) if value == value else 1

    def is_current(self, key: str) -> bool:
        """Finished, and measured the way this code measures (ddpm_engine.metrics.MEASURE_VERSION)."""
        from ddpm_engine.metrics import MEASURE_VERSION

        return self.is_finished(key) and self.measure_version(key) >= MEASURE_VERSION

    def outdated(self, specs: list[RunSpec], chosen: set[str] | None = None) -> list[RunSpec]:
        """Finished keys measured under an older MEASURE_VERSION: to measure again."""
        return [
            s
            for s in specs
            if self.is_finished(s.key) and not self.is_current(s.key) and (chosen is None or s.arm.label in chosen)
        ]

    def todo(
        self, specs: list[RunSpec], *, rerun: bool = False, retry_failed: bool = False, chosen: set[str] | None = None
    ) -> tuple[list[RunSpec], list[tuple[RunSpec, str]]]:
        """(specs to run, [(spec, why not)]): pending, running (a dead process's) and
        interrupted keys run; failed ones only with ``retry_failed``; everything with ``rerun``."""
        todo, skipped = [], []
        for spec in specs:
            state = self.state(spec.key)
            if chosen is not None and spec.arm.label not in chosen:
                skipped.append((spec, "not chosen"))
            elif rerun or state.resumable or (state is FAILED and retry_failed):
                todo.append(spec)
            else:
                skipped.append((spec, str(state)))
        return todo, skipped

    def design_rows(self, manifest: dict) -> pd.DataFrame:
        """One row per planned (arm, seed) of the design: run_key, arm, seed, status, error,
        mlflow_run_id, seconds, params, updated, config_json. Planned keys without a row are
        pending; rows of keys the design does not plan (an earlier version of the study)
        are left out and counted in ``stale``."""
        import pandas as pd

        columns = [
            "run_key",
            "arm",
            "seed",
            "status",
            "error",
            "mlflow_run_id",
            "seconds",
            "params",
            "updated",
            "config_json",
        ]
        planned = manifest.get("runs") or [
            {"run_key": k, "arm": r.get("arm"), "seed": r.get("seed")} for k, r in self.rows.items()
        ]
        out = []
        for run in planned:
            row = self.row(run["run_key"])
            out.append(
                {
                    "run_key": run["run_key"],
                    "arm": str(run["arm"]),
                    "seed": int(run["seed"]),
                    "status": str(self.state(run["run_key"])),
                    "error": str(row.get("error") or ""),
                    "mlflow_run_id": str(row.get("mlflow_run_id") or ""),
                    "seconds": _number(row.get("seconds")),
                    "params": _number(row.get("params")),
                    "updated": str(row.get("updated") or ""),
                    "config_json": str(row.get("config_json") or ""),
                }
            )
        frame = pd.DataFrame(out, columns=columns)
        if not manifest.get("runs"):
            # no design recorded: the finished row, else the newest, of each (arm, seed)
            frame = frame.assign(_f=frame["status"] != str(FINISHED)).sort_values(
                ["_f", "updated"], ascending=[True, False]
            )
            frame = frame.drop_duplicates(["arm", "seed"]).drop(columns="_f")
        return frame.reset_index(drop=True)

    def stale_keys(self, manifest: dict) -> list[str]:
        planned = {r["run_key"] for r in manifest.get("runs") or []}
        return [k for k in self.rows if planned and k not in planned]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
