"""One experiment, end to end: train -> periodic per-t probe -> sample with drift -> quality.

``run_experiment`` is the engine's single entry point for the harness: a config in, events
out to a Recorder. It knows no tracker. It runs four phases in order: ``build``,
``train_with_probes``, ``sample_with_drift`` and ``measure`` (then ``record`` emits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, NoReturn

import numpy as np
import pandas as pd
import torch

from .config import ExperimentConfig, TrainConfig
from .data import ImageData, describe_split, engine_cache_dir, load_data
from .device import autocast_factory, peak_memory_mb, resolve_device, sample_chunk_size
from .diagnostics import (
    BOUND_TIMESTEPS,
    STAT_NAMES,
    DriftRecorder,
    bits_per_dim_bound,
    diffusion_bits_estimate,
    drift_summary,
    forward_eps_rms,
    forward_eps_timesteps,
    heldout_loss,
    per_t_probe,
    pixel_statistics,
    probe_timesteps,
    reference_losses,
    stratified_timesteps,
)
from .diffusion import Tables, predicted_eps
from .metrics import PER_RUN, REFERENCE_NAMES, per_t_summary
from .model import build_model, count_parameters
from .objectives import gaussian_noise
from .quality import classifier_side, load_classifier, memorisation, sample_quality
from .recorder import NullRecorder, Recorder
from .references import build_reference, reference_device
from .sampling import SAMPLERS, chunked_eps, in_precision
from .schedule import Schedule, make_schedule
from .shapes import DIGITS_SIDE
from .training import Trainer

# What sample_quality returns, from the registry: NaN for each when eval.quality is off, so
# that every run's summary has the same keys and the quality tables of a study line up.
# The trainer's history key holding the probe settings of its latest probe (a checkpoint keeps
# it), so that a finished checkpoint measured under other settings is probed again.
FINAL_PROBE_WITH = "final_probe_with"

QUALITY_KEYS = [m.name for m in PER_RUN.values() if m.source in ("quality.sample_quality", "quality.memorisation")]


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


@dataclass
class RunParts:
    """Everything a run needs before its first step."""

    config: ExperimentConfig
    device: torch.device
    data: ImageData
    schedule: Schedule
    model: torch.nn.Module  # the UNet, or a parameter-free reference denoiser (model.preset)
    trainer: Trainer | None  # None for a reference denoiser: nothing to train
    autocast: Callable[[], ContextManager] | None
    probe_x0: torch.Tensor  # held-out images, model space
    probe_noise: torch.Tensor  # same shape as probe_x0
    probe_grid: list[int]  # probed t
    best_ref: pd.DataFrame  # per probed t: each reference's loss and the lowest (references.py)
    reference_history: dict[str, list] = field(default_factory=lambda: {"train": [], "per_t": [], "bound": []})

    @property
    def denoiser(self) -> torch.nn.Module:
        """What probes and the sampler call: the weights sampled from (EMA if kept), or the reference."""
        return self.trainer.sampling_model if self.trainer is not None else self.model

    @property
    def history(self) -> dict[str, list]:
        return self.trainer.history if self.trainer is not None else self.reference_history

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0


@dataclass
class Sampled:
    """The samples of a run and the drift of the reverse chain that produced them."""

    x0: torch.Tensor  # model space, unclipped
    images: torch.Tensor  # uint8, in the data's levels
    drift: pd.DataFrame
    drift_hist: pd.DataFrame
    drift_reference: torch.Tensor  # the held-out x_0 that drift compares against
    seconds: float


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
        grid[pad + r * cell_h : pad + r * cell_h + h * scale, pad + col * cell_w : pad + col * cell_w + w * scale] = (
            big[i]
        )
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
    a checkpoint. Emits the table dataset first (the training split's name, digest and source),
    scalars while training and the tables train, per_t, probe (bound and held-out loss per
    probe), drift, drift_hist and quality at the end, plus the image ``samples``.

    ``should_stop`` is polled after every step; when it returns True a checkpoint is written
    and RunInterrupted is raised.
    """
    recorder = recorder or NullRecorder()
    started = time.perf_counter()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    parts = build(config, device, data)
    # first, so a tracker has the run's input (its training split) even if the run fails
    recorder.table("dataset", pd.DataFrame([describe_split(parts.data, config.data)]))
    resumed_from = train_with_probes(parts, recorder, checkpoint_dir, should_stop)
    train_seconds = time.perf_counter() - started
    sampled = sample_with_drift(parts)
    summary, tables = measure(parts, sampled, resumed_from=resumed_from, train_seconds=train_seconds, started=started)
    record(recorder, parts, summary, tables, sampled.images)
    return RunResult(summary=summary, samples=sampled.images, resumed_from_step=resumed_from, tables=tables)


def build(config: ExperimentConfig, device: torch.device, data: ImageData | None = None) -> RunParts:
    """Data (``data`` or loaded from config.data), schedule (config.diffusion), model
    (config.model, shaped by the data), trainer (config.train and config.objective) and
    probe inputs (config.eval), all on ``device``."""
    if config.sample.precision == "fp64" and device.type == "mps":  # refused before any training
        raise ValueError("sample.precision: fp64 needs float64, which MPS lacks: sample on the CPU or CUDA")
    data = data or load_data(config.data)
    schedule = make_schedule(config.diffusion)
    train_x0 = data.to_model_space(data.train).to(device)
    if config.model.preset in REFERENCE_NAMES:  # a reference arm: fitted, never trained
        model = build_reference(config.model.preset, schedule, train_x0, data.levels, config.objective.prediction)
        model = model.to(reference_device(device))
        trainer, autocast = None, None
    else:
        # The initial weights come from torch's global RNG: seeded here, just before they are drawn.
        torch.manual_seed(config.train.seed)
        model = build_model(config.model, data.channels, data.image_size).to(device)
        autocast = autocast_factory(device, config.train.precision, count_parameters(model))
        trainer = Trainer(config, model, schedule, train_x0, data.levels, device, autocast)
    probe_x0, probe_noise = probe_inputs(config, data, device)
    grid = probe_timesteps(schedule.T, config.eval.probe_timesteps)
    best_ref = reference_losses(
        schedule, train_x0, data.levels, probe_x0, probe_noise, grid, cache_dir=engine_cache_dir(config.data)
    )
    return RunParts(config, device, data, schedule, model, trainer, autocast, probe_x0, probe_noise, grid, best_ref)


def probe_inputs(config: ExperimentConfig, data: ImageData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's held-out images and noise. The noise is the replicate's draw
    (config.probe_draw_seed): every arm of a replicate is probed on the same noise (common
    random numbers), and each replicate on its own, so the spread over seeds includes it."""
    probe_x0 = data.to_model_space(data.heldout[: config.eval.probe_images]).to(device)
    generator = torch.Generator().manual_seed(config.probe_draw_seed)
    return probe_x0, torch.randn(probe_x0.shape, generator=generator).to(device)


def probe(parts: RunParts) -> dict[str, float]:
    """Per-t probe of the sampling weights at the trainer's current step. Its rows and bound
    go into the trainer's history, so a checkpoint keeps them; returns the bound."""
    schedule = parts.schedule
    frame = per_t_probe(
        parts.denoiser,
        schedule,
        parts.probe_x0,
        parts.probe_noise,
        parts.probe_grid,
        sigma=parts.config.diffusion.sigma,
        levels=parts.data.levels,
        clip_x0=False,
        autocast=parts.autocast,
        prediction=parts.config.objective.prediction,
    )
    bound = bits_per_dim_bound(schedule, frame, parts.probe_x0)
    bound["heldout_loss"] = heldout_loss(schedule, frame)
    frame = frame.merge(parts.best_ref, on="t", how="left")
    frame.insert(0, "step", parts.step)
    parts.history["per_t"].extend(frame.to_dict("records"))
    parts.history["bound"].append({"step": parts.step, **bound})
    parts.history[FINAL_PROBE_WITH] = parts.config.probe_signature()
    return bound


@dataclass
class _ThroughputWindow:
    """Images trained since the last logged row, and since when (probe time excluded)."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def budget_spent(trainer: Trainer, train_config: TrainConfig) -> bool:
    """Whether training is done: the planned steps are taken, or the seconds are used up."""
    planned = train_config.planned_steps()
    if planned is not None:
        return trainer.step >= planned
    return trainer.train_seconds >= train_config.budget_seconds


def train_with_probes(
    parts: RunParts,
    recorder: Recorder,
    checkpoint_dir: Path | None,
    should_stop: Callable[[], bool] | None,
) -> int:
    """Train until the budget is spent, resuming from ``checkpoint_dir`` when it holds a
    checkpoint; log, probe and checkpoint at their intervals and at the last step, and make
    sure the final step is probed. Returns the step resumed from (0 for a fresh run).

    Raises RunInterrupted, after writing a checkpoint, when ``should_stop()`` turns True.
    """
    trainer, tc, ec = parts.trainer, parts.config.train, parts.config.eval
    if trainer is None:  # a reference denoiser: train.steps do not apply, one probe describes it
        recorder.scalars(0, probe(parts))
        return 0
    resumed_from = trainer.step if trainer.restore(checkpoint_dir) else 0
    window = _ThroughputWindow()
    while not budget_spent(trainer, tc):
        step_start = time.perf_counter()
        trainer.train_step()
        trainer.train_seconds += time.perf_counter() - step_start
        window.images += tc.batch_size
        last = budget_spent(trainer, tc)
        if trainer.step % tc.log_every == 0 or last:
            row = trainer.flush_window(window.images_per_s())
            recorder.scalars(trainer.step, {k: v for k, v in row.items() if k != "step"})
            window = _ThroughputWindow()
        if trainer.step % ec.probe_every == 0 or last:
            recorder.scalars(trainer.step, probe(parts))
            window.start = time.perf_counter()  # probe time is not training throughput
        if checkpoint_dir is not None and (trainer.step % tc.checkpoint_every == 0 or last):
            trainer.save(checkpoint_dir)
        if should_stop is not None and should_stop() and not last:
            _interrupt(trainer, recorder, checkpoint_dir, window)
    if not trainer.history["per_t"] or trainer.history["per_t"][-1]["step"] != trainer.step:
        probe(parts)  # a run resumed after its last step was trained still needs its final probe
    elif trainer.history.get(FINAL_PROBE_WITH) != parts.config.probe_signature():
        # A finished checkpoint measured again under other settings (another replicate's draw,
        # other probe settings, an older MEASURE_VERSION): its final probe is taken again.
        # The earlier probes stay those of the training run.
        drop_final_probe(trainer.history, trainer.step)
        probe(parts)
    return resumed_from


def drop_final_probe(history: dict[str, list], step: int) -> None:
    """Remove the probe rows of ``step`` from a trainer's history."""
    history["per_t"] = [row for row in history["per_t"] if row["step"] != step]
    history["bound"] = [row for row in history["bound"] if row["step"] != step]


def _interrupt(
    trainer: Trainer, recorder: Recorder, checkpoint_dir: Path | None, window: _ThroughputWindow
) -> NoReturn:
    """Checkpoint and raise RunInterrupted. The steps since the last logged row are flushed
    first, so a non-finite loss among them is caught and their row is in the checkpoint; the
    row is emitted too, so that a tracker's history holds every row the train table will."""
    if trainer.unlogged:
        row = trainer.flush_window(window.images_per_s())
        recorder.scalars(trainer.step, {k: v for k, v in row.items() if k != "step"})
    if checkpoint_dir is not None:
        trainer.save(checkpoint_dir)
    raise RunInterrupted(trainer.step)


def sample_with_drift(parts: RunParts) -> Sampled:
    """Sample with config.sample's sampler from x_T ~ N(0, I) while a DriftRecorder follows the
    pixels of x_t along the reverse chain against q(x_t) of the held-out images; then split the
    drift by intervention (docs/design.md, "Drift, split"):

    - the model's own chain again, from x_T ~ q(x_T | x_0) of the held-out images built from the
      SAME eps as the first chain's x_T and with the same z at every step (``qstart_*``). The
      difference between the two chains is the start's share of the drift, free of draw noise
      (common random numbers); this chain against q(x_t) is the model's own share.
    - the data's Gaussian (Wiener) denoiser through the same sampler from the same x_T and
      noise (``gauss_chain_*``): a reference curve, not a share of anything.

    Cost: the second chain is a second full sampling run of the model (as many forward passes
    as the first, measured by benchmarks/diagnostics_overhead.py: docs/design.md, "Drift,
    split"); the Gaussian chain is a linear map per step. ``seconds`` times the first chain
    only, so sample_seconds stays the cost of sampling. x_T and every z are the replicate's draw
    (config.sample_draw_seed): the same for every arm of a replicate, new for each replicate."""
    drift = drift_recorder(parts)
    started = time.perf_counter()
    x0 = run_sampler(parts, parts.denoiser, parts.autocast, drift, eps_callback=drift.observe_eps)
    seconds = time.perf_counter() - started
    drift_table, drift_hist = drift.tables()
    qstart = chain_drift(parts, parts.denoiser, parts.autocast, "qstart", start_x0=heldout_start(parts))
    drift_table = drift_table.merge(qstart, on="t", how="left").merge(gauss_chain_drift(parts), on="t", how="left")
    exposure = drift.exposure_table().merge(forward_eps(parts, list(drift.eps_rms)), on="t", how="left")
    drift_table = drift_table.merge(exposure, on="t", how="left")
    return Sampled(x0, parts.data.from_model_space(x0), drift_table, drift_hist, drift.reference_x0, seconds)


def forward_eps(parts: RunParts, visited: list[int]) -> pd.DataFrame:
    """``q_eps_rms``: the sampled denoiser's predicted-noise RMS on forward states q(x_t | x_0)
    of the probe's held-out images and noise (at most eval.probe_images images), at the chain's
    visited t nearest the probe grid (``forward_eps_timesteps``), in the chain's precision. The
    exposure-bias measure divides the chain's own RMS (``eps_rms``) by it. Cost: one probe's
    forward passes (the grid's t x the probe images), against the chain's T x num_samples."""
    denoiser, autocast, dtype = in_precision(parts.denoiser, parts.autocast, parts.config.sample.precision)
    return forward_eps_rms(
        denoiser,
        parts.schedule,
        parts.probe_x0.to(dtype),
        parts.probe_noise.to(dtype),
        forward_eps_timesteps(visited, parts.probe_grid),
        autocast=autocast,
        prediction=parts.config.objective.prediction,
    )


def heldout_start(parts: RunParts) -> torch.Tensor:
    """The x_0 of the chain started from q(x_T | x_0): the held-out images in order, cycled to
    sample.num_samples (sample i starts from held-out image i mod their count)."""
    heldout = parts.data.to_model_space(parts.data.heldout).to(parts.device)
    return heldout[torch.arange(parts.config.sample.num_samples, device=heldout.device) % len(heldout)]


def run_sampler(
    parts: RunParts,
    denoiser: torch.nn.Module,
    autocast,
    callback,
    start_x0: torch.Tensor | None = None,
    eps_callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """x_0 from config.sample's sampler with ``denoiser``, x_T and every z drawn from the
    replicate's sampling seed (config.sample_draw_seed), its eps_scale, in its precision
    (``sampling.in_precision``: fp64 runs the chain and a float64 copy of the denoiser; x_T
    and z are the float32 draws, cast).

    x_T ~ N(0, I) by default; with ``start_x0`` (num_samples images in model space) x_T ~
    q(x_T | x_0) = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps (DDPM eq. 4), eps being the very
    draw that is x_T without it, and the generator then gives the same z: the two chains differ
    only in where they start. ``eps_callback(t, x_t, eps)`` sees the denoiser's predicted noise
    (its output read as objective.prediction) at every visited t, before eps_scale divides it."""
    config, data, device = parts.config, parts.data, parts.device
    sc = config.sample
    denoiser, autocast, dtype = in_precision(denoiser, autocast, sc.precision)
    generator = torch.Generator(device=device).manual_seed(config.sample_draw_seed)
    chunk_size = sc.batch_size or sample_chunk_size(device, data.channels * data.image_size**2)
    shape = (sc.num_samples, data.channels, data.image_size, data.image_size)
    x_T = gaussian_noise(shape, generator, device, config.objective.noise_clip)
    if start_x0 is not None:
        if tuple(start_x0.shape) != shape:
            raise ValueError(f"start_x0 must have shape {shape}, got {tuple(start_x0.shape)}")
        abar_T = float(parts.schedule.alphabar[-1])
        x_T = math.sqrt(abar_T) * start_x0.to(device, x_T.dtype) + math.sqrt(1.0 - abar_T) * x_T
    eps = chunked_eps(denoiser, chunk_size, autocast)
    if eps_callback is not None:
        eps = observed_eps(eps, eps_callback, parts.schedule.on(device, dtype), config.objective.prediction)
    return SAMPLERS[sc.sampler](
        eps,
        x_T.to(dtype),
        parts.schedule,
        generator=generator,
        noise_clip=config.objective.noise_clip,
        clip_x0=sc.clip_x0,
        sigma=config.diffusion.sigma,
        prediction=config.objective.prediction,
        steps=sc.steps,
        eta=sc.eta,
        eps_scale=sc.eps_scale,
        callback=callback,
    )


def observed_eps(
    denoiser: Callable,
    eps_callback: Callable[[int, torch.Tensor, torch.Tensor], None],
    tables: Tables,
    prediction: str = "eps",
) -> Callable:
    """``denoiser`` that also shows every (t, x_t, eps-hat) it computes to ``eps_callback``; the
    output, read as ``prediction``, is converted to eps-hat for the callback only (the sampler
    gets it as it is)."""

    def observed(x: torch.Tensor, t: int) -> torch.Tensor:
        output = denoiser(x, t)
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps_callback(t, x, predicted_eps(tables, x, t_vec, output, prediction))
        return output

    return observed


CHAIN_STATS = ("mean", "std", "frac_out")  # what the drift table keeps of the extra chains


def chain_drift(
    parts: RunParts, denoiser: torch.nn.Module, autocast, prefix: str, start_x0: torch.Tensor | None = None
) -> pd.DataFrame:
    """``<prefix>_mean``, ``_std`` and ``_frac_out`` of x_t per reverse step of ``run_sampler``
    with ``denoiser`` (from ``start_x0``'s q(x_T | x_0) when given), t from T down to 0."""
    rows: list[tuple[int, torch.Tensor]] = []
    run_sampler(parts, denoiser, autocast, lambda t, x: rows.append((t, pixel_statistics(x, 2)[0])), start_x0)
    stats = torch.stack([r[1] for r in rows]).cpu().numpy()
    columns = {f"{prefix}_{name}": stats[:, STAT_NAMES.index(name)] for name in CHAIN_STATS}
    return pd.DataFrame({"t": [r[0] for r in rows], **columns})


def gauss_chain_drift(parts: RunParts) -> pd.DataFrame:
    """gauss_chain_mean, _std, _frac_out: the arm's sampler with the data's Gaussian (Wiener)
    denoiser from the same x_T ~ N(0, I) and noise. A reference curve (what a chain that knows
    only the data's mean and covariance does), not the model's share: the training set's exact
    optimum departs from it more than trained UNets do. Cheap: a linear map per step."""
    device = reference_device(parts.device)
    train_x0 = parts.data.to_model_space(parts.data.train).to(device)
    # it answers in the run's target, which run_sampler reads the output as
    gaussian = build_reference(
        "gaussian", parts.schedule, train_x0, parts.data.levels, parts.config.objective.prediction
    )
    return chain_drift(parts, gaussian.to(device), None, "gauss_chain")


def drift_recorder(parts: RunParts) -> DriftRecorder:
    """The sampler's callback that records drift against all held-out images, noised with a
    stream of its own (the replicate's probe draw + 1), independent of the probe's and the sampler's."""
    ec, data, device = parts.config.eval, parts.data, parts.device
    reference_x0 = data.to_model_space(data.heldout).to(device)
    generator = torch.Generator().manual_seed(parts.config.probe_draw_seed + 1)
    reference_noise = torch.randn(reference_x0.shape, generator=generator).to(device)
    return DriftRecorder(
        parts.schedule, reference_x0, reference_noise, bins=ec.drift_bins, hist_steps=ec.drift_hist_steps
    )


def measure(
    parts: RunParts, sampled: Sampled, *, resumed_from: int, train_seconds: float, started: float
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """The run summary (the final bound, drift, quality, cost and the final probe's per-t
    summary; the same keys for every config) and the run's tables."""
    history, tc = parts.history, parts.config.train
    summary: dict[str, float] = dict(history["bound"][-1])
    summary.pop("step")
    summary.update(drift_summary(sampled.drift, sampled.x0, sampled.drift_reference))
    summary.update(quality_summary(parts, sampled.x0))
    train_rows = history["train"]
    summary.update(
        final_loss=float(np.mean([r["loss"] for r in train_rows[-4:]])) if train_rows else float("nan"),
        params=float(count_parameters(parts.model)),
        bf16_autocast=float(parts.autocast is not None),
        images_per_s=float(np.median([r["images_per_s"] for r in train_rows])) if train_rows else float("nan"),
        train_seconds=train_seconds,
        sample_seconds=sampled.seconds,
        seconds_per_sample=sampled.seconds / parts.config.sample.num_samples,
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak_memory_mb(parts.device),
        resumed_from_step=float(resumed_from),
        train_steps=float(parts.step),
        train_images=float(parts.step * tc.batch_size),
        train_loop_seconds=parts.trainer.train_seconds if parts.trainer is not None else 0.0,
    )
    summary.update(final_bound(parts, summary))
    per_t = pd.DataFrame(history["per_t"])
    summary.update(per_t_summary(per_t[per_t["step"] == per_t["step"].iloc[-1]].reset_index(drop=True)))
    tables = {
        "train": pd.DataFrame(train_rows, columns=["step", "loss", "lr", "grad_norm", "images_per_s"]),
        "per_t": per_t,
        "probe": pd.DataFrame(history["bound"]),
        "drift": sampled.drift,
        "drift_hist": sampled.drift_hist,
        "quality": pd.DataFrame([summary]),
    }
    return summary, tables


def final_bound(parts: RunParts, probed: dict[str, float]) -> dict[str, float]:
    """bpd of the final weights without interpolating between probed t: every L_{t-1} for
    T <= 201, else the first 100 t exactly and one t per stratum of 100 strata over the rest
    (an unbiased estimate, its standard error in bpd_se). The same t for every arm of a
    replicate: drawn from its probe draw."""
    generator = torch.Generator().manual_seed(parts.config.probe_draw_seed + 2)
    ts, sizes = stratified_timesteps(parts.schedule.T, BOUND_TIMESTEPS, generator)
    rows = per_t_probe(
        parts.denoiser,
        parts.schedule,
        parts.probe_x0,
        parts.probe_noise,
        ts,
        sigma=parts.config.diffusion.sigma,
        levels=parts.data.levels,
        autocast=parts.autocast,
        prediction=parts.config.objective.prediction,
    )
    middle, se = diffusion_bits_estimate(rows["vlb_bits"].to_numpy(), sizes)
    return {"bpd": probed["prior_bits"] + probed["l0_bits"] + middle, "diffusion_bits": middle, "bpd_se": se}


def quality_summary(parts: RunParts, x0: torch.Tensor) -> dict[str, float]:
    """sample_quality of the samples against the train images (in the features of the
    classifier of the data's labels, where it has labels), or NaN for each of QUALITY_KEYS
    when eval.quality is off."""
    config, data = parts.config, parts.data
    if not config.eval.quality:
        return dict.fromkeys(QUALITY_KEYS, math.nan)
    reference = quality_reference(config, data)
    classifier = None
    if reference.train_labels is not None:
        # digits upsampled by image_size carry no more than their 8x8: classify them there
        native = DIGITS_SIDE if reference.name == "digits" else None
        side = classifier_side(reference.image_size, native)
        classifier = load_classifier(
            reference.train, reference.train_labels, reference.levels, config.data.cache_dir, side
        )
    out = sample_quality(
        x0.float().cpu(), reference.to_model_space(reference.train).float(), classifier, levels=data.levels
    )
    # memorisation is of the run's own training images, whatever the yardstick of quality
    train = data.to_model_space(data.train).float()
    out.update(memorisation(x0.float().cpu(), train, data.to_model_space(data.heldout).float()))
    return out


def quality_reference(config: ExperimentConfig, data: ImageData) -> ImageData:
    """The data samples are judged against (eval.quality_reference): the run's own split, or
    with ``uncapped`` the same data loaded without data.max_images, so that arms trained on
    100 or 1,797 digits are measured by one classifier against one set of images."""
    if config.eval.quality_reference == "uncapped" and config.data.max_images is not None:
        return load_data(config.data.model_copy(update={"max_images": None}))
    return data


def record(
    recorder: Recorder,
    parts: RunParts,
    summary: dict[str, float],
    tables: dict[str, pd.DataFrame],
    images: torch.Tensor,
) -> None:
    """Emit the end of run: the summary's scalars at the final step, every table, and a grid
    of the first 64 samples."""
    recorder.scalars(parts.step, {k: v for k, v in summary.items() if isinstance(v, float)})
    for name, frame in tables.items():
        recorder.table(name, frame)
    recorder.image("samples", sample_grid(_to_display(images, parts.data.levels)[:64]))


def _to_display(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Stretch ``levels`` grey levels to 0..255 for viewing (digits have 17)."""
    return (images.float() * (255.0 / (levels - 1))).round().clamp(0, 255).to(torch.uint8)
