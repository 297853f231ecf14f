"""harness plan's clock: CPU time on one thread, so a plan made beside other work is not
inflated by the time its steps wait for a core."""

from __future__ import annotations

import time

import pytest
import torch

from harness.cost import step_clock, timing_threads


def test_the_cpu_clock_does_not_count_waiting():
    # a step that waits for a core (here: sleeps) costs no CPU; wall time would count it all
    clock = step_clock(torch.device("cpu"))
    start = clock()
    time.sleep(0.3)
    assert clock() - start < 0.1
    # work does count, however long a loaded machine makes it take
    start, deadline = clock(), time.perf_counter() + 60
    while clock() - start < 0.05 and time.perf_counter() < deadline:
        sum(range(1000))
    assert clock() - start >= 0.05


def test_timing_is_on_one_thread_and_the_thread_count_is_restored():
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    try:
        with timing_threads(cpu):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), timing_threads(cpu):
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
