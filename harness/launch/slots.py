"""Local scheduling: a few long-lived worker processes ("slots") drain the run list.

Each slot owns one device (a CUDA GPU, or a share of the CPU threads) and runs the engine;
the parent process is the single writer to MLflow and Parquet, fed by an event queue. A
slot that dies takes only its current run down (recorded as failed); Ctrl-C asks every slot
to checkpoint and stop, and so does an MLflow store that fails for good (the runs' Parquet
records go on, ``store_failure`` says why).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ddpm_engine.files import DISK_FULL, write_error_message

from ..runs.checkpoints import checkpoint_dir
from ..runs.lifecycle import execute
from ..store.states import Outcome, RunState
from ..study.plan import RunSpec

if TYPE_CHECKING:  # a slot never touches MLflow; importing it there would delay every start by ~2 s
    from ..store.tracking import RunTracker


@dataclass
class RunOutcome:
    spec: RunSpec
    outcome: Outcome = field(default_factory=lambda: Outcome(RunState.PENDING))

    @property
    def state(self) -> RunState:
        return self.outcome.state


def estimated_cost(spec: RunSpec) -> float:
    """A relative cost for ordering (longest first): training plus sampling work, both
    roughly proportional to parameters x pixels x forward passes."""
    c = spec.config
    size = (c.data.image_size or 8) ** 2
    width = (c.model.base_channels or 32) ** 2 * sum(m * m for m in c.model.channel_mults or (1,))
    steps = c.train.planned_steps()
    if steps is None:  # a wall-clock budget: its seconds stand in for the work
        return c.train.budget_seconds * 1e12
    train = steps * c.train.batch_size * 3
    sample_steps = c.diffusion.T if c.sample.sampler == "ddpm" else (c.sample.steps or c.diffusion.T)
    return width * size * (train + sample_steps * c.sample.num_samples)


# Linux exposes a GPU's kernel driver here (NVIDIA, ROCm, WSL); without one torch cannot see
# a CUDA device, and the parent skips importing torch (1.5-2 s) before its slots start.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def cuda_device_count() -> int:
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slot_devices(device: str, workers: int | None, runs: int = 1) -> list[tuple[str, int]]:
    """(device, torch threads) per slot: one slot per CUDA GPU, else ``workers`` CPU slots
    sharing the cores.

    On CPU the default is one slot per core, but no more slots than ``runs``: the small
    models of these studies scale poorly across threads. On a 2-core machine two 1-thread
    runs side by side did 1.45x the work of the same two runs one after the other with 2
    threads each (2026-11-25, tiny UNet, 400 steps plus sampling).
    """
    count = cuda_device_count() if device == "auto" or device.startswith("cuda") else 0
    if count:
        n = min(workers or count, count)
        return [(f"cuda:{i}", 1) for i in range(n)]
    if device.startswith("cuda"):
        raise ValueError("--device cuda was requested but no CUDA device is visible")
    cores = os.cpu_count() or 1
    n = workers or max(1, min(cores, runs))
    return [("cpu", max(1, cores // n))] * n


# ------------------------------------------------------------------ worker side


class QueueRecorder:
    """Forwards engine events to the parent process."""

    def __init__(self, events: mp.Queue, key: str):
        self.events, self.key = events, key

    def scalars(self, step, values):
        self.events.put(("scalars", self.key, step, dict(values)))

    def table(self, name, frame):
        self.events.put(("table", self.key, name, frame))

    def image(self, name, pixels):
        self.events.put(("image", self.key, name, pixels))


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies (e.g. SIGKILL), so no orphan keeps training unseen."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def _exit_now(signum, frame) -> None:
    # SystemExit rather than death by the signal: a checkpoint half written goes with its
    # temp file (atomic_write's cleanup runs), the previous checkpoint stays whole
    raise SystemExit(128 + signum)


def slot_main(slot: int, device: str, threads: int, tasks: mp.Queue, events: mp.Queue, stop, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides, the slot checkpoints.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_now)  # the parent's "stop at once" (a second Ctrl-C)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    while True:
        task = tasks.get()
        if task is None:
            # Every result is with the parent once the queue has flushed; skipping the
            # interpreter's teardown (about 1 s of freeing torch) ends the study sooner.
            events.close()
            events.join_thread()
            os._exit(0)
        key, config, ckpt = task
        if stop.is_set():
            events.put(("not_started", key))
            continue
        events.put(("started", key, slot))
        outcome = execute(
            config, QueueRecorder(events, key), device=device, checkpoint_dir=ckpt, should_stop=stop.is_set
        )
        events.put(("ended", key, outcome))


# ------------------------------------------------------------------ parent side


class LocalScheduler:
    """Runs specs on local slots; the caller gets progress callbacks and outcomes.

    ``start`` launches the slots at once: they never touch MLflow, so they import torch
    and train while the parent opens the tracking store; ``run`` then records their events.
    """

    def __init__(
        self,
        specs: list[RunSpec],
        results: Path,
        slots: list[tuple[str, int]],
        fresh_keys: set[str] = frozenset(),
        on_event: Callable[[str, RunSpec, tuple], None] | None = None,
        replaced_keys: set[str] = frozenset(),
    ):
        self.specs = sorted(specs, key=estimated_cost, reverse=True)
        self.by_key = {s.key: s for s in specs}
        self.results, self.slots = Path(results), slots
        self.fresh_keys = set(fresh_keys)  # run from scratch: checkpoints removed, a new MLflow run
        self.replaced_keys = set(replaced_keys)  # a new MLflow run, checkpoints kept (a re-measure)
        self.store_failure: Exception | None = None  # the MLflow store failed for good: slots stopped
        self.on_event = on_event or (lambda kind, spec, payload: None)
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.Event()
        self.stop_at_once = False  # a second Ctrl-C: record the running runs as interrupted, wait for nothing
        self.outcomes: dict[str, RunOutcome] = {}
        self.procs: dict[int, mp.Process] = {}
        self.tasks = self.events = None
        # Runs that share a training (plan.train_key) with a run queued before them wait for
        # it to end, then are measured from its checkpoint instead of training it again.
        self.waiting: dict[str, list[RunSpec]] = {}
        self.n_slots = 0
        self.closed = False  # every run is queued and each slot has its end-of-queue marker

    def request_stop(self) -> None:
        self.stop.set()

    def request_stop_at_once(self) -> None:
        """Stop without waiting for checkpoints: ``run`` ends its running runs as interrupted
        (each resumes from its last periodic checkpoint) at its next look at the queue."""
        self.stop.set()
        self.stop_at_once = True

    def start(self) -> None:
        """Queue every run and launch the slots; they begin work at once."""
        if self.tasks is not None or not self.specs:
            return
        self.tasks, self.events = self.ctx.Queue(), self.ctx.Queue()
        first: dict[str, RunSpec] = {}
        for spec in self.specs:
            ckpt = checkpoint_dir(self.results, spec)
            if spec.key in self.fresh_keys and ckpt.exists():
                shutil.rmtree(ckpt)
            if spec.train_key in first:
                self.waiting.setdefault(spec.train_key, []).append(spec)
            else:
                first[spec.train_key] = spec
                self._queue(spec)
        self.n_slots = min(len(self.slots), len(first))
        if not self.waiting:
            self._close_queue()
        for slot in range(self.n_slots):
            self._launch(slot)

    def _queue(self, spec: RunSpec) -> None:
        self.tasks.put((spec.key, spec.config, str(checkpoint_dir(self.results, spec))))

    def _close_queue(self) -> None:
        """One end-of-queue marker per slot: a slot exits when it takes one."""
        self.closed = True
        for _ in range(self.n_slots):
            self.tasks.put(None)

    def _release(self, spec: RunSpec, state: RunState) -> None:
        """The runs waiting on ``spec``'s training go into the queue once it has finished; when
        it did not finish, only the next of them (which trains, or resumes, in its turn)."""
        waiting = self.waiting.get(spec.train_key, [])
        released = list(waiting) if state is RunState.FINISHED else waiting[:1]
        del waiting[: len(released)]
        if not waiting:
            self.waiting.pop(spec.train_key, None)
        for each in released:
            self._queue(each)
        if released and not self.waiting:
            self._close_queue()

    def abort(self, timeout: float = 60.0) -> None:
        """Stop before ``run``: the slots checkpoint their runs (which resume next time)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in self.procs.values()) and time.monotonic() < deadline:
            try:  # a slot cannot exit while its queued events are unread
                self.events.get(timeout=0.2)
            except queue.Empty:
                pass
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()

    def _launch(self, slot: int) -> None:
        device, threads = self.slots[slot]
        proc = self.ctx.Process(
            target=slot_main, args=(slot, device, threads, self.tasks, self.events, self.stop, os.getpid()), daemon=True
        )
        # A spawned slot imports the CLI and torch before slot_main runs: a Ctrl-C then raised
        # KeyboardInterrupt there, a traceback per slot. An ignored SIGINT is inherited through
        # exec and Python keeps it ignored, so the slot ignores it from its first instruction.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            proc.start()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        self.procs[slot] = proc

    def run(self, make_tracker: Callable[[RunSpec], RunTracker]) -> list[RunOutcome]:
        """Record the slots' events through one tracker per run until every run has ended."""
        if not self.specs:
            return []
        self.start()
        trackers = {spec.key: make_tracker(spec) for spec in self.specs}
        current: dict[int, str] = {}
        while len(self.outcomes) < len(self.specs) and not self.stop_at_once:
            try:
                event = self.events.get(timeout=0.1)  # a second Ctrl-C is seen within this
            except queue.Empty:
                self._reap_dead(current, trackers)
                if not any(p.is_alive() for p in self.procs.values()) and self.events.empty():
                    break
                continue
            try:
                self._handle(event, trackers, current)
            except OSError as error:  # results/ cannot be written (full, read-only): nothing more can be recorded
                self._abandon(current, trackers, error)
                raise
            self._watch_store(self.by_key[event[1]], trackers[event[1]])
        if self.stop_at_once:
            self._end_at_once(current, trackers)
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        return [self.outcomes.get(s.key, RunOutcome(s)) for s in self.specs]

    def _end_at_once(self, current: dict[int, str], trackers: dict[str, RunTracker]) -> None:
        """End the slots now and record the runs they were running as interrupted (each
        resumes from its last periodic checkpoint). Events already sent are still recorded:
        a run whose end is among them ends as it says."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:  # a slot cannot exit while its queued events are unread
                self._handle(self.events.get(timeout=0.1), trackers, current)
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs.values()):
                    break
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        reason = "stopped at once by a second Ctrl-C; resumes from its last checkpoint"
        for key in current.values():
            if key not in self.outcomes:
                self._end(self.by_key[key], trackers[key], Outcome(RunState.INTERRUPTED, reason=reason))
                self.on_event("ended", self.by_key[key], (self.outcomes[key].outcome,))
        current.clear()

    def _watch_store(self, spec: RunSpec, tracker: RunTracker) -> None:
        """After an event: an MLflow store that failed for good (``RunTracker.store_failure``,
        shared by the trackers) stops the slots at their checkpoints, as a Ctrl-C does. The runs
        go on being recorded in Parquet until they end; MLflow gets them at the next `harness run`."""
        failure = tracker.store_failure
        if failure is not None and self.store_failure is None:
            self.store_failure = failure
            self.request_stop()
            self.on_event("store_failed", spec, (failure,))

    def _abandon(self, current: dict[int, str], trackers: dict[str, RunTracker], error: OSError) -> None:
        """Stop the slots at once after the parent failed to write; each running run is marked
        failed with the reason where it still can be (MLflow may live on another disk)."""
        self.stop.set()
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        reason = write_error_message(error)
        for key in current.values():
            try:
                trackers[key].fail(reason)
            except Exception:  # noqa: BLE001 - the same disk may refuse this record too
                pass

    def _handle(self, event: tuple, trackers: dict[str, RunTracker], current: dict[int, str]) -> None:
        kind, key = event[0], event[1]
        spec, tracker = self.by_key[key], trackers[key]
        if kind == "started":
            current[event[2]] = key
            tracker.start(fresh=key in self.fresh_keys or key in self.replaced_keys)
        elif kind == "not_started":
            self.outcomes[key] = RunOutcome(spec)
        elif kind == "scalars":
            tracker.scalars(event[2], event[3])
        elif kind == "table":
            tracker.table(event[2], event[3])
        elif kind == "image":
            tracker.image(event[2], event[3])
        elif kind == "ended":
            self._end(spec, tracker, event[2])
            for slot, running in list(current.items()):
                if running == key:
                    del current[slot]
        self.on_event(kind, spec, event[2:])

    def _end(self, spec: RunSpec, tracker: RunTracker, outcome: Outcome) -> None:
        tracker.end(outcome)
        self.outcomes[spec.key] = RunOutcome(spec, outcome)
        self._watch_store(spec, tracker)
        if self.tasks is not None:
            self._release(spec, outcome.state)
        if outcome.state is RunState.FAILED and DISK_FULL in outcome.reason:
            self.request_stop()  # the other runs would fail on the same disk: they checkpoint and stop

    def _reap_dead(self, current, trackers) -> None:
        """A slot that died mid-run (killed, out of memory) fails that run; a fresh slot
        takes over the rest of the queue."""
        for slot, proc in list(self.procs.items()):
            if proc.is_alive() or slot not in current:
                continue
            key = current.pop(slot)
            reason = f"worker process died (exit code {proc.exitcode}) while running this run"
            self._end(self.by_key[key], trackers[key], Outcome(RunState.FAILED, reason=reason))
            self.on_event("ended", self.by_key[key], (self.outcomes[key].outcome,))
            if len(self.outcomes) < len(self.specs) and not self.stop.is_set():
                if self.closed:  # else the markers put at closing count it among the slots
                    self.tasks.put(None)  # the replacement slot needs its own end-of-queue marker
                self._launch(slot)
