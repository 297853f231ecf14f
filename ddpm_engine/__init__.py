"""ddpm_engine: a small, readable DDPM library with every seed ablation as a config knob.

    from ddpm_engine import ExperimentConfig, run_experiment, MemoryRecorder
    result = run_experiment(ExperimentConfig(), MemoryRecorder(), device="cpu")
"""

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
from .experiment import RunInterrupted, RunResult, run_experiment, sample_grid
from .recorder import MemoryRecorder, NullRecorder, Recorder
from .schedule import Schedule, make_schedule
from .training import NonFiniteLossError

__all__ = [
    "DataConfig", "DiffusionConfig", "EvalConfig", "ExperimentConfig", "ModelConfig",
    "ObjectiveConfig", "SampleConfig", "TrainConfig", "RunInterrupted", "RunResult",
    "run_experiment", "sample_grid", "MemoryRecorder", "NullRecorder", "Recorder",
    "Schedule", "make_schedule", "NonFiniteLossError",
]
