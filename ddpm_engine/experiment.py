"""One experiment, end to end: train -> periodic per-t probe -> sample with drift -> quality.

``run_experiment`` is the engine's single entry point for the harness: a config in, events
out to a Recorder. It knows no tracker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import ExperimentConfig
from .data import ImageData, load_data
from .device import autocast_factory, peak_memory_mb, resolve_device, sample_chunk_size
from .diagnostics import (
    DriftRecorder,
    bits_per_dim_bound,
    drift_summary,
    heldout_loss,
    per_t_probe,
    probe_timesteps,
)
from .model import build_model, count_parameters
from .quality import load_digit_classifier, sample_quality
from .recorder import NullRecorder, Recorder
from .sampling import sample
from .schedule import make_schedule
from .training import Trainer


class RunInterrupted(Exception):
    """The caller asked the run to stop; a checkpoint at ``step`` was written first."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} (checkpoint written)")
        self.step = step


@dataclass
class RunResult:
    summary: dict[str, float]
    samples: torch.Tensor  # uint8, N x C x H x W, in the data's levels
    resumed_from_step: int = 0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def sample_grid(images: torch.Tensor, columns: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N x C x H x W) into one H x W x C array, each pixel ``scale`` times
    larger (nearest), so an 8x8 digit is visible without a blurring viewer."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.full((rows * cell_h + pad, columns * cell_w + pad, c), 255, dtype=np.uint8)
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * cell_h : pad + r * cell_h + h * scale, pad + col * cell_w : pad + col * cell_w + w * scale] = big[i]
    return grid


def run_experiment(
    config: ExperimentConfig,
    recorder: Recorder | None = None,
    *,
    device: str | torch.device = "auto",
    checkpoint_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    data: ImageData | None = None,
) -> RunResult:
    """Train, probe, sample and measure one config; resume from ``checkpoint_dir`` if it holds
    a checkpoint. Emits scalars while training and the tables train, per_t, drift,
    probe (bound and held-out loss per probe), drift, drift_hist and quality at the end, plus the image ``samples``.

    ``should_stop`` is polled after every step; when it returns True a checkpoint is written
    and RunInterrupted is raised.
    """
    recorder = recorder or NullRecorder()
    started = time.perf_counter()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    tc, ec, sc = config.train, config.eval, config.sample

    data = data or load_data(config.data)
    levels = data.levels
    schedule = make_schedule(config.diffusion)
    torch.manual_seed(tc.seed)
    model = build_model(config.model, data.channels, data.image_size).to(device)
    params = count_parameters(model)
    autocast = autocast_factory(device, tc.precision)
    trainer = Trainer(
        config, model, schedule, data.to_model_space(data.train).to(device), levels, device, autocast
    )
    resumed = trainer.restore(checkpoint_dir)
    resumed_from = trainer.step if resumed else 0

    # Common random numbers: the probe's images and noise depend only on eval settings.
    probe_x0 = data.to_model_space(data.heldout[: ec.probe_images]).to(device)
    probe_gen = torch.Generator().manual_seed(ec.probe_seed)
    probe_noise = torch.randn(probe_x0.shape, generator=probe_gen).to(device)
    grid = probe_timesteps(schedule.T, ec.probe_timesteps)

    def probe() -> dict[str, float]:
        frame = per_t_probe(
            trainer.sampling_model, schedule, probe_x0, probe_noise, grid,
            sigma=config.diffusion.sigma, levels=levels, clip_x0=False, autocast=autocast,
        )
        bound = bits_per_dim_bound(schedule, frame, probe_x0)
        bound["heldout_loss"] = heldout_loss(schedule, frame)
        frame.insert(0, "step", trainer.step)
        trainer.history["per_t"].extend(frame.to_dict("records"))
        trainer.history["bound"].append({"step": trainer.step, **bound})
        return bound

    planned = tc.planned_steps()

    def budget_spent() -> bool:
        if planned is not None:
            return trainer.step >= planned
        return trainer.train_seconds >= tc.budget_seconds

    window_start, window_images = time.perf_counter(), 0
    while not budget_spent():
        step_start = time.perf_counter()
        trainer.train_step()
        trainer.train_seconds += time.perf_counter() - step_start
        window_images += tc.batch_size
        last = budget_spent()
        if trainer.step % tc.log_every == 0 or last:
            now = time.perf_counter()
            row = trainer.flush_window(window_images / max(now - window_start, 1e-9))
            recorder.scalars(trainer.step, {k: v for k, v in row.items() if k != "step"})
            window_start, window_images = time.perf_counter(), 0
        if trainer.step % ec.probe_every == 0 or last:
            bound = probe()
            recorder.scalars(trainer.step, bound)
            window_start = time.perf_counter()  # probe time is not training throughput
        if checkpoint_dir is not None and (trainer.step % tc.checkpoint_every == 0 or last):
            trainer.save(checkpoint_dir)
        if should_stop is not None and should_stop() and not last:
            if trainer.unlogged:
                trainer.flush_window(window_images / max(time.perf_counter() - window_start, 1e-9))
            if checkpoint_dir is not None:
                trainer.save(checkpoint_dir)
            raise RunInterrupted(trainer.step)
    if not trainer.history["per_t"] or trainer.history["per_t"][-1]["step"] != trainer.step:
        probe()  # a run resumed after its last step was trained still needs its final probe
    train_seconds = time.perf_counter() - started

    # Sampling: the same x_T and noise for every arm and seed.
    sample_gen = torch.Generator(device=device).manual_seed(sc.seed)
    drift_x0 = data.to_model_space(data.heldout).to(device)
    drift_noise = torch.randn(drift_x0.shape, generator=torch.Generator().manual_seed(ec.probe_seed + 1)).to(device)
    drift = DriftRecorder(schedule, drift_x0, drift_noise, bins=ec.drift_bins, hist_steps=ec.drift_hist_steps)
    chunk = sc.batch_size or sample_chunk_size(device, data.channels * data.image_size**2)
    sample_start = time.perf_counter()
    x0 = sample(
        trainer.sampling_model, schedule, (sc.num_samples, data.channels, data.image_size, data.image_size),
        generator=sample_gen, device=device, sampler=sc.sampler, sigma=config.diffusion.sigma,
        ddim_steps=sc.steps, eta=sc.eta, clip_x0=sc.clip_x0, noise_clip=config.objective.noise_clip,
        chunk_size=chunk, observer=drift, autocast=autocast,
    )
    sample_seconds = time.perf_counter() - sample_start
    drift_table, drift_hist = drift.tables()

    samples_uint8 = data.from_model_space(x0)
    summary: dict[str, float] = dict(trainer.history["bound"][-1])
    summary.pop("step")
    summary.update(drift_summary(drift_table, x0, drift_x0))
    if ec.quality:
        classifier = None
        if data.name == "digits" and data.train_labels is not None:
            classifier = load_digit_classifier(data.train, data.train_labels, config.data.cache_dir)
        summary.update(sample_quality(x0.float().cpu(), data.to_model_space(data.train).float(), classifier))
    train_rows = trainer.history["train"]
    summary.update(
        final_loss=float(np.mean([r["loss"] for r in train_rows[-4:]])) if train_rows else float("nan"),
        params=float(params),
        bf16_autocast=float(autocast is not None),
        images_per_s=float(np.median([r["images_per_s"] for r in train_rows])) if train_rows else float("nan"),
        train_seconds=train_seconds,
        sample_seconds=sample_seconds,
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak_memory_mb(device),
        resumed_from_step=float(resumed_from),
        train_steps=float(trainer.step),
        train_images=float(trainer.step * tc.batch_size),
        train_loop_seconds=trainer.train_seconds,
    )
    recorder.scalars(trainer.step, {k: v for k, v in summary.items() if isinstance(v, float)})

    tables = {
        "train": pd.DataFrame(train_rows, columns=["step", "loss", "lr", "grad_norm", "images_per_s"]),
        "per_t": pd.DataFrame(trainer.history["per_t"]),
        "probe": pd.DataFrame(trainer.history["bound"]),
        "drift": drift_table,
        "drift_hist": drift_hist,
        "quality": pd.DataFrame([summary]),
    }
    for name, frame in tables.items():
        recorder.table(name, frame)
    recorder.image("samples", sample_grid(_to_display(samples_uint8, levels)[:64]))
    return RunResult(summary=summary, samples=samples_uint8, resumed_from_step=resumed_from, tables=tables)


def _to_display(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Stretch ``levels`` grey levels to 0..255 for viewing (digits have 17)."""
    return (images.float() * (255.0 / (levels - 1))).round().clamp(0, 255).to(torch.uint8)
