"""The life of a run: the one function that executes it and says what it ended as.

Every way of running a spec (the local slots, a distributed worker, a tuning trial) calls
``execute``; each then maps the returned ``Outcome`` onto its own bookkeeping (a tracker, an
Optuna trial state) in one place. The states and the outcome (harness.store.states) are the
vocabulary of the ``runs`` table, of ``harness status`` and of the report.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..store.states import Outcome, RunState

if TYPE_CHECKING:
    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.recorder import Recorder


class RunAbandoned(Exception):
    """Raised from ``should_stop`` when the run must stop without being recorded as ended
    (a distributed trial that another worker declared stale and retried)."""


def execute(
    config: ExperimentConfig,
    recorder: Recorder,
    *,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Run one config through the engine and say how it ended. Any exception of the run is
    a FAILED outcome with its reason (one failing run never takes others down); only
    ``RunAbandoned`` and BaseExceptions (KeyboardInterrupt, SystemExit) propagate. The
    engine's RunNote warnings go into the reason of a finished run (and before the failure
    or interruption of another): the run's record keeps them."""
    from ddpm_engine import RunInterrupted, run_experiment
    from ddpm_engine.files import DiskFull
    from ddpm_engine.recorder import RunNote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunNote)
        try:
            result = run_experiment(
                config, recorder, device=device, checkpoint_dir=checkpoint_dir, should_stop=should_stop
            )
        except RunAbandoned:
            raise
        except RunInterrupted as exc:
            outcome = Outcome(
                RunState.INTERRUPTED,
                reason=f"interrupted at step {exc.step}; resumes from its checkpoint",
                step=exc.step,
            )
        except DiskFull as exc:  # its message names the file; "OSError: [Errno 28]" adds nothing
            outcome = Outcome(RunState.FAILED, reason=str(exc), traceback=traceback.format_exc())
        except Exception as exc:  # noqa: BLE001 - any failure of one run is an outcome
            outcome = Outcome(RunState.FAILED, reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        else:
            outcome = Outcome(RunState.FINISHED, summary=result.summary)
    notes = []
    for warning in caught:
        if issubclass(warning.category, RunNote):
            notes.append(str(warning.message))
        else:  # recording took every warning; the others are shown as they would have been
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    outcome.reason = "; ".join(notes + [outcome.reason] if outcome.reason else notes)
    return outcome
