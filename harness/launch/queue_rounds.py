"""Adaptive seeds on the queue: the process that enqueued the study is its coordinator.

Locally, rounds of runs alternate with looks at the hypotheses (harness.launch.local). On a
shared Optuna storage the same loop runs in the launcher's process: it enqueues the first
seeds of every arm, waits until the queue has drained (working on it itself unless told not
to), pulls the finished runs from MLflow, looks (harness.study.sequential), enqueues the seeds
the look asks for, and so on until every hypothesis is decided or the seed budget is spent.

Between rounds the queue is empty for a moment, which would tell `harness worker`s to exit.
While the coordinator lives it holds a lease on the study (``LEASE_ATTR``: a time
``grace_period`` seconds ahead, refreshed every heartbeat interval), and a worker that finds
the queue empty waits while the lease holds; a coordinator that dies lets it lapse and the
workers exit as they would on a fixed design.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from ..study.plan import RunSpec, study_manifest
from ..terminal import console
from .rounds import first_round, next_seeds, planned_specs
from .trial_queue import MANIFEST_ATTR, enqueue, pull_from_mlflow, trials_by_key

LEASE_ATTR = "rounds_open_until"  # study user attr: UNIX time until which more rounds may come


class RoundLease:
    """Holds the study's lease from ``with`` to its end, refreshed by a daemon thread."""

    def __init__(self, queue, every: float, lasts: float):
        self.queue, self.every, self.lasts = queue, every, lasts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="round-lease", daemon=True)

    def _refresh(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.queue.set_user_attr(LEASE_ATTR, time.time() + self.lasts)
            except Exception as error:  # noqa: BLE001 - a database hiccup: the next refresh tries again
                console.print(f"[yellow]round lease not refreshed:[/] {type(error).__name__}: {error}")

    def __enter__(self) -> RoundLease:
        self.queue.set_user_attr(LEASE_ATTR, time.time() + self.lasts)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.queue.set_user_attr(LEASE_ATTR, 0.0)  # released: workers exit once the queue is empty


def rounds_open(storage, study_id: int) -> bool:
    """Whether a coordinator may still enqueue runs of the study (its lease holds)."""
    return float(storage.get_study_user_attrs(study_id).get(LEASE_ATTR, 0.0)) > time.time()


def run_rounds(q, study, specs: list[RunSpec], *, results: Path, retry_failed: bool, drain: Callable[[], int]):
    """Drive an adaptive study on its queue (the first round already enqueued): ``drain``
    works on or waits for the queue and returns an exit code (130: stopped, then no further
    round). Returns (the last drain's code, the specs enqueued in all)."""
    # a coordinator started again (after a kill or Ctrl-C) resumes at the round it had reached:
    # every key already in the queue is part of the design so far, not only the first seeds
    enqueued = set(trials_by_key(q.queue))
    wanted = {
        arm: sorted(set(seeds) | {s.seed for s in specs if s.arm.label == arm and s.key in enqueued})
        for arm, seeds in first_round(study, specs).items()
    }
    configs = {s.key: s.config_json for s in specs}

    def publish() -> None:  # the design so far, for `harness status` and reports elsewhere
        if q.manifest != (manifest := study_manifest(study, planned_specs(specs, wanted))):
            q.manifest = manifest
            q.queue.set_user_attr(MANIFEST_ATTR, manifest)

    publish()
    settings = q.settings
    with RoundLease(q.queue, settings.heartbeat_interval, settings.grace_period):
        while True:
            code = drain()
            if code == 130:
                break
            pull_from_mlflow(q.client, study.study, results, q.manifest, configs, log=console.print)
            following = next_seeds(study, specs, results, wanted)
            if following == wanted:
                break
            wanted = following
            publish()
            outcome = enqueue(q.queue, planned_specs(specs, wanted), retry_failed=retry_failed)
            console.print(f"adaptive seeds: enqueued {len(outcome.enqueued)} run(s) for the next round")
    return code, planned_specs(specs, wanted)
