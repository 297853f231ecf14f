"""ddpm_engine: a small, readable DDPM library with every seed ablation as a config knob.

from ddpm_engine import ExperimentConfig, run_experiment, MemoryRecorder
result = run_experiment(ExperimentConfig(), MemoryRecorder(), device="cpu")
"""

import importlib

from .config import (
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    SampleConfig,
    TrainConfig,
)

# Everything but the config needs torch (1.5-2 s to import): loaded on first use, so that a
# caller which only validates configs (the harness CLI before its workers start) skips it.
_LAZY = {
    "RunInterrupted": "experiment",
    "RunResult": "experiment",
    "run_experiment": "experiment",
    "sample_grid": "experiment",
    "MemoryRecorder": "recorder",
    "NullRecorder": "recorder",
    "Recorder": "recorder",
    "Schedule": "schedule",
    "make_schedule": "schedule",
    "NonFiniteLossError": "training",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "SampleConfig",
    "TrainConfig",
    *_LAZY,
]
