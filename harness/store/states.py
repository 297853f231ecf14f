"""A run key's state and what a run ended as: the vocabulary of the `runs` table, of the
MLflow run's status and tags, of `harness status` and of the report (docs/design.md, "Run
states"). Here, below everything that records or reads them, so that the store can record an
outcome without knowing how a run is executed (harness.runs.lifecycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class RunState(str, Enum):
    """A run key's state. ``str`` so that it is stored in Parquet and compared with text."""

    PENDING = "pending"  # planned, never started (or its start was cancelled)
    RUNNING = "running"  # started and not ended (a live run, or one whose process died)
    FINISHED = "finished"
    FAILED = "failed"  # an exception or a non-finite loss; the reason is kept
    INTERRUPTED = "interrupted"  # stopped on request after a checkpoint; resumes next time

    def __str__(self) -> str:
        return self.value

    @property
    def resumable(self) -> bool:
        """Run again by a plain `harness run` (failed ones need --retry-failed)."""
        return self in (RunState.PENDING, RunState.RUNNING, RunState.INTERRUPTED)

    @classmethod
    def parse(cls, text: object) -> RunState:
        """A state from any stored spelling; unknown or missing text is PENDING."""
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            return cls.PENDING


@dataclass
class Outcome:
    state: RunState
    summary: dict[str, float] = field(default_factory=dict)
    # failed: "Type: message"; interrupted: where it stopped; finished: what else happened to
    # the run (the engine's RunNote warnings, e.g. a checkpoint set aside), else empty
    reason: str = ""
    step: int | None = None  # interrupted: the checkpointed step
    traceback: str = ""
