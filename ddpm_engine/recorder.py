"""The one seam between the engine and whoever tracks it.

`run_experiment` emits events to a Recorder and knows nothing of trackers. A harness fans
these out to MLflow and Parquet; a notebook can use `MemoryRecorder`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd


class RunNote(UserWarning):
    """Something that happened to a run that its record should keep although the run went on
    (a checkpoint that did not load and was set aside, say). The harness collects these
    warnings into the run's outcome; alone, the engine shows them as warnings."""


class Recorder(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars observed at a training step (streamed; e.g. loss, lr, images/s)."""

    def table(self, name: str, frame: pd.DataFrame) -> None:
        """A whole named table of the run (dataset, train, per_t, drift, drift_hist, quality)."""

    def image(self, name: str, pixels: np.ndarray) -> None:
        """An HxWxC uint8 image, e.g. a grid of samples."""


class MemoryRecorder:
    """Keeps every event in memory: for notebooks and tests."""

    def __init__(self) -> None:
        self.scalar_log: list[tuple[int, dict[str, float]]] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.images: dict[str, np.ndarray] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.scalar_log.append((step, dict(values)))

    def table(self, name: str, frame: pd.DataFrame) -> None:
        self.tables[name] = frame

    def image(self, name: str, pixels: np.ndarray) -> None:
        self.images[name] = pixels


class NullRecorder:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def table(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def image(self, name: str, pixels: np.ndarray) -> None:
        pass
