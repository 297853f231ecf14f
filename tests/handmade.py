"""Tiny studies written by hand as the harness would write them (study.json + Parquet tables),
so that report tests know every answer without running the engine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from harness.store.tables import write_table

AXIS = "variant"

# hypotheses.parquet's columns as issue 12 specifies them (the code's list must match this one)
HYPOTHESES_COLUMNS = [
    "name",
    "arm",
    "metric",
    "versus",
    "expect",
    "value",
    "n",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "verdict",
]


def run_key(study: str, arm: str, seed: int) -> str:
    return hashlib.sha256(f"{study}/{arm}/{seed}".encode()).hexdigest()[:12]


def write_study(
    root: Path,
    study: str,
    arms: list[str],
    seeds: list[int],
    baseline: str,
    question: str = "Hand-made study",
    hypotheses: dict | None = None,
) -> Path:
    """study.json of a one-axis study whose levels are the arm names (and its hypotheses
    block, as `harness run` records it)."""
    folder = Path(root) / study
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(
        json.dumps(
            {
                "study": study,
                "question": question,
                "design": "one_at_a_time",
                "axes": {AXIS: arms},
                "baseline": {AXIS: baseline},
                "baseline_arm": baseline,
                "seeds": seeds,
                "arms": [{"arm": a, "levels": {AXIS: a}, "overrides": {}} for a in arms],
                "hypotheses": hypotheses or {},
            }
        )
    )
    return folder


def write_run(
    root: Path,
    study: str,
    arm: str,
    seed: int,
    status: str = "finished",
    config: dict | None = None,
    **tables: pd.DataFrame,
) -> str:
    """A runs row (with ``config`` as its resolved config) and the given tables
    (``quality=frame``, ``per_t=frame``, ...) of one run."""
    key = run_key(study, arm, seed)
    write_table(
        root,
        study,
        "runs",
        key,
        pd.DataFrame(
            [
                {
                    "study": study,
                    "arm": arm,
                    "seed": seed,
                    AXIS: arm,
                    "status": status,
                    "error": "boom" if status == "failed" else "",
                    "mlflow_run_id": f"mlflow-{key}",
                    "params": 1000.0,
                    "seconds": 1.0,
                    "config_json": json.dumps(config) if config else "",
                }
            ]
        ),
    )
    for name, frame in tables.items():
        write_table(root, study, name, key, frame)
    return key
