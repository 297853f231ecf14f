"""harness plan's clock: CPU time on one thread, so a plan made beside other work is not
inflated by the time its steps wait for a core."""

from __future__ import annotations

import time

import pytest
import torch

from harness.study.cost import step_clock, timing_threads


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


def test_the_estimate_counts_the_final_bound_and_a_measured_only_run_pays_no_training():
    # the step time is pinned (a timing is no unit test): what is checked is the arithmetic
    from ddpm_engine import ExperimentConfig
    from ddpm_engine.config import DataConfig
    from ddpm_engine.data import load_data
    from ddpm_engine.diagnostics import BOUND_TIMESTEPS
    from harness.study.cost import FORWARD_SHARE, estimate

    data = load_data(DataConfig())
    cpu = torch.device("cpu")

    def priced(**sections):
        config = ExperimentConfig.from_dict(
            {"train": {"steps": 100, "batch_size": 32}, "sample": {"num_samples": 8}} | sections
        )
        cache: dict = {}
        estimate(config, data, cpu, cache)
        for key, value in list(cache.items()):
            cache[key] = 1.0 if key[0] == "sample precision" else (value[0], 0.3)
        return estimate(config, data, cpu, cache)

    per_image_forward = 0.3 * FORWARD_SHARE / 32
    short = priced(diffusion={"T": 50}, eval={"probe_images": 64, "probe_every": 25})
    long = priced(diffusion={"T": 1000}, eval={"probe_images": 64, "probe_every": 25})
    assert short.bound_seconds == pytest.approx(per_image_forward * 50 * 64)  # every t
    assert long.bound_seconds == pytest.approx(per_image_forward * (BOUND_TIMESTEPS + 1) * 64)  # the strata
    assert long.total_seconds == pytest.approx(
        long.train_seconds + long.sample_seconds + long.probe_seconds + long.bound_seconds
    )
    assert long.measure_seconds == pytest.approx(
        long.sample_seconds + long.bound_seconds + long.probe_seconds / long.probes
    )
    assert long.probes > 1 and long.measure_seconds < long.total_seconds - long.train_seconds
