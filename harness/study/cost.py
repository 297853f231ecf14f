"""Cost estimates for `harness plan`: parameters, and time from a few measured steps."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ddpm_engine.config import ExperimentConfig
from ddpm_engine.data import ImageData
from ddpm_engine.device import autocast_factory
from ddpm_engine.diagnostics import BOUND_TIMESTEPS, probe_timesteps
from ddpm_engine.metrics import REFERENCE_NAMES
from ddpm_engine.model import build_model, count_parameters
from ddpm_engine.schedule import make_schedule
from ddpm_engine.training import Trainer

# A forward pass costs about a third of forward + backward + optimizer step.
FORWARD_SHARE = 1 / 3


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock a cost is timed with. On the CPU, this process's CPU time: a plan made while
    other work shares the cores (a CI run, another study) would otherwise count the time its
    steps waited for a core, and printed estimates 30 to 500 times too long on this 2-core
    machine. Timed on one thread (``timing_threads``), it is what a step costs a core. On a
    GPU, wall time between synchronisations: the kernels' time is not this process's CPU time."""
    return time.process_time if device.type == "cpu" else time.perf_counter


@contextmanager
def timing_threads(device: torch.device):
    """One torch thread while timing on the CPU: CPU time summed over threads would count
    OpenMP's spin-waiting, and one thread is what a slot of `harness run --workers N` on N
    cores has, so the estimate is CPU time per run, the column `harness plan` prints."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Estimate:
    params: int
    step_seconds: float
    train_seconds: float
    sample_seconds: float
    probe_seconds: float
    bound_seconds: float = 0.0  # the final weights' bits/dim (experiment.final_bound)
    probes: int = 1  # how many probes probe_seconds holds

    @property
    def total_seconds(self) -> float:
        return self.train_seconds + self.sample_seconds + self.probe_seconds + self.bound_seconds

    @property
    def measure_seconds(self) -> float:
        """A run measured from a finished training (a sampling-only arm, a re-measure): its
        chains, the final bound and one probe, no training."""
        one_probe = self.probe_seconds / max(1, self.probes)
        return self.sample_seconds + self.bound_seconds + one_probe


def measure_step_seconds(
    config: ExperimentConfig, data: ImageData, device: torch.device, steps: int = 3
) -> tuple[int, float]:
    """Parameters and seconds per training step, timed over ``steps`` after one warm-up."""
    schedule = make_schedule(config.diffusion)
    model = build_model(config.model, data.channels, data.image_size).to(device)
    images = data.to_model_space(data.train[: max(config.train.batch_size, 1)]).to(device)
    trainer = Trainer(
        config,
        model,
        schedule,
        images,
        data.levels,
        device,
        autocast_factory(device, config.train.precision, count_parameters(model)),
    )
    clock = step_clock(device)
    with timing_threads(device):
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        for _ in range(steps):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = clock() - start
    return count_parameters(model), seconds / steps


def precision_factor(config: ExperimentConfig, data: ImageData, device: torch.device, repeats: int = 3) -> float:
    """How many times a sampling forward pass of this model costs in config.sample.precision
    what it costs in float32: 1 for fp32; for fp64 timed here on one batch, since it depends
    on the device (here 4x on one CPU thread for the tiny UNet; far more on consumer GPUs)."""
    if config.sample.precision == "fp32":
        return 1.0
    import copy

    model = build_model(config.model, data.channels, data.image_size).to(device).eval()
    batch = torch.randn(min(config.sample.num_samples, 256), data.channels, data.image_size, data.image_size)
    t = torch.full((len(batch),), max(1, config.diffusion.T // 2), dtype=torch.long, device=device)
    seconds = []
    clock = step_clock(device)
    for net, dtype in ((model, torch.float32), (copy.deepcopy(model).to(torch.float64), torch.float64)):
        x = batch.to(device, dtype)
        with torch.no_grad(), timing_threads(device):
            net(x, t)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            for _ in range(repeats):
                net(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(clock() - start)
    return seconds[1] / max(seconds[0], 1e-9)


def reference_estimate(config: ExperimentConfig, data: ImageData, device: torch.device) -> Estimate:
    """A reference arm trains nothing: fit it, time one call on a sampling batch, and scale
    by the sampler's steps (plus one probe over the grid)."""
    from ddpm_engine.references import build_reference

    schedule = make_schedule(config.diffusion)
    reference = build_reference(config.model.preset, schedule, data.to_model_space(data.train).to(device), data.levels)
    batch = torch.randn(config.sample.num_samples, data.channels, data.image_size, data.image_size, device=device)
    t = torch.full((len(batch),), max(1, schedule.T // 2), dtype=torch.long, device=device)
    clock = step_clock(device)
    with timing_threads(device):
        reference(batch, t)
        start = clock()
        reference(batch, t)
        call = clock() - start
    T = config.diffusion.T
    sample_steps = T if config.sample.sampler == "ddpm" else min(config.sample.steps or T, T)
    grid = len(probe_timesteps(T, config.eval.probe_timesteps))
    per_image = call / len(batch)
    probe_images = min(config.eval.probe_images, len(data.heldout))
    return Estimate(
        0,
        0.0,
        0.0,
        call * sample_steps,
        per_image * grid * probe_images,
        per_image * min(T, BOUND_TIMESTEPS + 1) * probe_images,
    )


def estimate(config: ExperimentConfig, data: ImageData, device: torch.device, cache: dict) -> Estimate:
    """Time of one run: measured training steps, plus sampling and probes scaled from them."""
    if config.model.preset in REFERENCE_NAMES:
        return reference_estimate(config, data, device)
    signature = (
        config.model.model_dump_json(),
        config.train.batch_size,
        config.train.precision,
        data.channels,
        data.image_size,
    )
    if signature not in cache:
        cache[signature] = measure_step_seconds(config, data, device)
    params, step = cache[signature]
    precision_key = ("sample precision", config.sample.precision, *signature)
    if precision_key not in cache:
        cache[precision_key] = precision_factor(config, data, device)
    per_image_forward = step * FORWARD_SHARE / config.train.batch_size
    T = config.diffusion.T
    sample_steps = T if config.sample.sampler == "ddpm" else min(config.sample.steps or T, T)
    planned = config.train.planned_steps()
    steps = planned if planned is not None else max(1, int(config.train.budget_seconds / step))
    n_probes = -(-steps // config.eval.probe_every)
    probe_images = min(config.eval.probe_images, len(data.heldout))
    grid = len(probe_timesteps(T, config.eval.probe_timesteps))
    return Estimate(
        params=params,
        step_seconds=step,
        train_seconds=step * steps,
        # two chains of the model: from N(0, I), and from q(x_T | x_0) for the drift split
        # (ddpm_engine.experiment.sample_with_drift), plus the predicted noise on forward states
        # at the probe grid (experiment.forward_eps), all in the sampling precision; the Gaussian
        # reference chain is a linear map
        sample_seconds=per_image_forward
        * cache[precision_key]
        * (2 * sample_steps * config.sample.num_samples + grid * probe_images),
        probe_seconds=per_image_forward * grid * probe_images * n_probes,
        # every L_{t-1} up to T = BOUND_TIMESTEPS + 1, else BOUND_TIMESTEPS strata
        bound_seconds=per_image_forward * min(T, BOUND_TIMESTEPS + 1) * probe_images,
        probes=n_probes,
    )


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
