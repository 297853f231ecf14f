"""Progress of `harness run` when stdout is not a terminal (CI, nohup, a log file): a line per
ended run and, every ``interval`` seconds, a line with runs done / total, each running run's
step and an ETA. (On a terminal the CLI draws rich progress bars instead.)"""

from __future__ import annotations

import time
from typing import Callable

from ..study.plan import RunSpec

# said when the MLflow store fails for good while runs train (harness.launch.slots)
STORE_FAILED = "{}: checkpointing the running runs and stopping; their records go on into results/"


class PlainProgress:
    def __init__(
        self,
        todo: list[RunSpec],
        emit: Callable[[str], None],
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.emit, self.interval, self.clock = len(todo), emit, interval, clock
        self.started = self.last_line = clock()
        self.done = 0
        self.running: dict[str, tuple[RunSpec, int]] = {}  # key -> (spec, current step)
        self.run_started: dict[str, float] = {}

    def on_event(self, kind: str, spec: RunSpec, payload: tuple) -> None:
        if kind == "started":
            self.running[spec.key] = (spec, 0)
            self.run_started[spec.key] = self.clock()
        elif kind == "scalars" and spec.key in self.running and "loss" in payload[1]:
            self.running[spec.key] = (spec, int(payload[0]))
        elif kind == "ended":
            self.running.pop(spec.key, None)
            self.done += 1
            outcome = payload[0]
            seconds = self.clock() - self.run_started.pop(spec.key, self.clock())
            note = f": {outcome.reason}" if outcome.reason else ""  # a finished run's reason: what else happened
            self.emit(f"{outcome.state} {spec.name} ({spec.key}) in {seconds:.0f} s{note} [{self.done}/{self.total}]")
        elif kind == "store_failed":
            self.emit(STORE_FAILED.format(payload[0]))
        if self.clock() - self.last_line >= self.interval:
            self.emit(self.status_line())

    def fraction(self) -> float:
        """Share of the work done: finished runs plus the trained share of running ones."""
        partial = 0.0
        for spec, step in self.running.values():
            planned = spec.config.train.planned_steps()
            partial += min(step / planned, 1.0) if planned else 0.0
        return (self.done + partial) / self.total if self.total else 1.0

    def status_line(self) -> str:
        self.last_line = now = self.clock()
        elapsed, fraction = now - self.started, self.fraction()
        eta = f"{elapsed * (1 - fraction) / fraction:.0f} s" if fraction > 0 else "unknown"
        steps = ", ".join(
            f"{spec.name} step {step}/{spec.config.train.planned_steps() or '?'}"
            for spec, step in self.running.values()
        )
        return f"{self.done}/{self.total} runs done, {elapsed:.0f} s elapsed, ETA {eta}" + (
            f"; running: {steps}" if steps else ""
        )
