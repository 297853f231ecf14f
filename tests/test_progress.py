"""Plain progress lines for `harness run` under CI or nohup (no terminal)."""

from harness.runs.lifecycle import Outcome, RunState
from harness.runs.progress import PlainProgress
from harness.study.plan import expand
from harness.study.spec import load_study


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_per_ended_run_and_a_periodic_status_with_eta(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("study: s\nquestion: q\nbase: {train: {steps: 100}}\nseeds: [0, 1]\n")
    specs = expand(load_study(study))
    lines, clock = [], Clock()
    progress = PlainProgress(specs, lines.append, interval=30, clock=clock)
    first, second = specs
    progress.on_event("started", first, (0,))
    progress.on_event("started", second, (1,))
    clock.now = 10
    progress.on_event("scalars", first, (50, {"loss": 0.5}))
    assert lines == []  # nothing before the interval
    clock.now = 40
    progress.on_event("scalars", second, (50, {"loss": 0.5}))
    # half of each of two runs trained in 40 s: half the work left, ETA 40 s
    assert lines[-1] == "0/2 runs done, 40 s elapsed, ETA 40 s; running: base-s0 step 50/100, base-s1 step 50/100"
    clock.now = 45
    progress.on_event("ended", first, (Outcome(RunState.FINISHED),))
    assert lines[-1] == "finished base-s0 (" + first.key + ") in 45 s [1/2]"
    progress.on_event("ended", second, (Outcome(RunState.FAILED, reason="ValueError: boom"),))
    assert lines[-1] == "failed base-s1 (" + second.key + ") in 45 s: ValueError: boom [2/2]"
