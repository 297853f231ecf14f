"""The sampler check of a study: for each distinct (data, schedule, sampler) its arms use, the
reverse chain of the training data's Gaussian denoiser, propagated in closed form
(``ddpm_engine.sampler_check``), against the forward marginals q(x_t).

It needs no trained model, so it tells the drift the setup forces (the prior gap at t = T of a
schedule that does not reach noise, a broken sampler) from the drift a model adds. Shown by
`harness plan`, written by `harness run` to ``results/<study>/sampler_check.parquet`` (one row
per combination, with the arms that use it) and shown in the report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..store.tables import write_frame
from ..study.plan import RunSpec

FILE = "sampler_check.parquet"


def combinations(specs: list[RunSpec]) -> dict[str, list[RunSpec]]:
    """Specs grouped by what the check depends on: the data and the diffusion and sample configs."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        c = spec.config
        key = (
            c.data.model_dump_json()
            + c.diffusion.model_dump_json()
            + c.sample.model_dump_json(include={"sampler", "steps", "eta", "eps_scale"})
        )
        groups.setdefault(key, []).append(spec)
    return groups


def sampler_check_table(specs: list[RunSpec], data: dict | None = None) -> pd.DataFrame:
    """One row per combination: the check's gaps and the arms that use it. ``data`` maps a
    data config's JSON to loaded ImageData (loaded here when missing)."""
    from ddpm_engine.data import load_data
    from ddpm_engine.sampler_check import TABLE_COLUMNS, check_config

    data = dict(data or {})
    rows = []
    for group in combinations(specs).values():
        config = group[0].config
        key = config.data.model_dump_json()
        if key not in data:
            data[key] = load_data(config.data)
        images = data[key]
        # any target the arm may use gives the exact denoiser's chain; eps has none at zero terminal SNR
        result = check_config(
            config.diffusion, config.sample, images.to_model_space(images.train), config.objective.prediction
        )
        row = {column: result[column] for column in TABLE_COLUMNS}
        row["approximation"] = result.get("approximation", "")
        row["arms"] = ", ".join(dict.fromkeys(s.arm.label for s in group))
        rows.append(row)
    return pd.DataFrame(rows)


def write_sampler_checks(results: Path, study: str, table: pd.DataFrame) -> Path:
    return write_frame(Path(results) / study / FILE, table)


def read_sampler_checks(results: Path, study: str) -> pd.DataFrame:
    path = Path(results) / study / FILE
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def record_sampler_checks(results: Path, study: str, specs: list[RunSpec]) -> None:
    """results/<study>/sampler_check.parquet (a fraction of a second per combination)."""
    write_sampler_checks(results, study, sampler_check_table(specs))
