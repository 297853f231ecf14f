"""The metric registry (ddpm_engine.metrics) is the truth about what a run emits."""

from __future__ import annotations

import math

import pytest

from ddpm_engine import ExperimentConfig, MemoryRecorder, run_experiment
from ddpm_engine.metrics import PER_RUN, TABLES, report_columns, tunable
from harness.store.tables import table_columns
from harness.study.spec import Tune


@pytest.fixture(scope="module")
def emitted():
    config = ExperimentConfig.from_dict(
        {
            "model": {"base_channels": 16, "time_embed_dim": 32},
            "diffusion": {"T": 12},
            "train": {"steps": 6, "batch_size": 16, "log_every": 3, "warmup_steps": 1},
            "sample": {"num_samples": 8},
            "eval": {"probe_every": 3, "probe_images": 16, "quality": False, "drift_hist_steps": 3},
        }
    )
    recorder = MemoryRecorder()
    result = run_experiment(config, recorder, device="cpu")
    return recorder, result


def test_every_table_a_run_emits_has_exactly_the_declared_columns(emitted):
    recorder, _ = emitted
    assert set(recorder.tables) == set(TABLES)
    for name, frame in recorder.tables.items():
        assert list(frame.columns) == list(TABLES[name]) or set(frame.columns) == set(TABLES[name]), name


def test_the_summary_is_the_declared_per_run_metrics_whatever_the_config(emitted):
    recorder, result = emitted
    assert set(result.summary) == set(PER_RUN)  # eval.quality off: its metrics are NaN, not absent
    assert math.isnan(result.summary["fd"])
    final_step, final_scalars = recorder.scalar_log[-1]
    assert set(final_scalars) == set(PER_RUN)


def test_the_parquet_schema_doc_derives_from_the_registry():
    columns = table_columns()
    for table, metrics in TABLES.items():
        assert set(metrics) | {"run_key"} == set(columns[table])
    assert {"run_key", "status", "error", "mlflow_run_id"} <= set(columns["runs"])


def test_report_columns_and_tunable_metrics_come_from_the_registry():
    names = [m.name for m in report_columns()]
    assert "fd" in names and "final_mean_gap" in names and "seconds" in names
    assert "seconds" not in tunable() and "images_per_s" not in tunable()  # costs
    assert {"heldout_loss", "fd", "coverage", "final_mean_gap"} <= set(tunable())


def test_tuning_a_signed_gap_minimises_its_absolute_value():
    tune = Tune.model_validate({"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "final_mean_gap"})
    assert tune.resolved_direction == "minimize"
    # a darker sample (-0.3) is no better than a brighter one (+0.3), and worse than -0.1
    assert tune.objective({"final_mean_gap": -0.3}) == tune.objective({"final_mean_gap": 0.3}) == pytest.approx(0.3)
    assert tune.objective({"final_mean_gap": -0.1}) < tune.objective({"final_mean_gap": -0.3})
    coverage = Tune.model_validate({"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "coverage"})
    assert coverage.resolved_direction == "maximize" and coverage.objective({"coverage": 0.7}) == 0.7


def test_design_doc_is_generated_from_the_registry():
    from harness import design_doc

    text = design_doc.DOC.read_text(encoding="utf-8")
    assert design_doc.render(text) == text, "docs/design.md is out of date: run `python -m harness.design_doc`"
    for name in PER_RUN:
        assert f"| `{name}` |" in text


def test_loss_t_le_10_is_the_mean_loss_over_every_t_up_to_10():
    """Its definition: the mean of loss_mse over t = 1..10, linear between probed t."""
    import pandas as pd

    from ddpm_engine.metrics import SMALL_T_MAX, per_t_summary

    def summary(ts, losses):
        return per_t_summary(pd.DataFrame({"t": ts, "loss_mse": losses}))["loss_t_le_10"]

    assert SMALL_T_MAX == 10
    every = list(range(1, 21))
    curve = [1.0 / t for t in every]  # probed at every t: the plain mean of the first ten
    assert summary(every, curve) == pytest.approx(sum(curve[:10]) / 10)
    # a sparse grid (T = 1000's starts 1, 2, 3, 4, 6, 9, 13): a line stays a line, t = 1..10
    sparse = [1, 2, 3, 4, 6, 9, 13, 500]
    assert summary(sparse, [float(t) for t in sparse]) == pytest.approx(5.5)
    # t = 10 interpolated between 9 and 13, not cut at 9 (whose mean would be 5.0)
    assert summary([1, 9, 13], [1.0, 9.0, 13.0]) == pytest.approx(5.5)
    assert summary([1, 2, 3], [3.0, 3.0, 6.0]) == pytest.approx(4.0)  # T = 3: over 1..3
    assert math.isnan(summary([20, 40], [1.0, 2.0]))  # no probed t at or below 10


def test_the_engine_emits_loss_t_le_10_and_seconds_per_sample(emitted):
    _, result = emitted
    final = result.tables["per_t"].query(f"step == {result.tables['per_t']['step'].max()}").set_index("t")
    assert result.summary["loss_t_le_10"] == pytest.approx(final.loc[1:10, "loss_mse"].mean())  # T = 12: all probed
    assert result.summary["seconds_per_sample"] == pytest.approx(result.summary["sample_seconds"] / 8)
