"""The drift split by intervention (docs/design.md, "Drift, split"), at engine level, no training.

The model's own chain is run a second time from x_T ~ q(x_T | x_0) of held-out images with the
first chain's eps and z. With an exact denoiser the chain maps the mean of q(x_t) to the mean
of q(x_{t-1}) (the tower property), so its own drift is sampling noise only, and the start's
share is what the closed-form sampler check (ddpm_engine/sampler_check.py) computes for the
same schedule. Each check is against a standard error computed from the samples, and each has
a counterpart that must fail it (a biased denoiser, or a start that is not q(x_T)).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ddpm_engine import ExperimentConfig
from ddpm_engine.data import ImageData
from ddpm_engine.diagnostics import drift_summary
from ddpm_engine.experiment import build, heldout_start, run_sampler, sample_with_drift
from ddpm_engine.references import build_reference
from ddpm_engine.sampler_check import check_config

SIDE, LEVELS = 4, 256


@pytest.fixture(autouse=True)
def _no_probe_references(tmp_path, monkeypatch):
    """build() would fit and probe the four references over every t for the per-t probe
    (80 s here); the drift split never reads them."""
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr("ddpm_engine.experiment.reference_losses", lambda *a, **k: pd.DataFrame({"t": []}))


def _gaussian_images(n_train: int, n_heldout: int, seed: int = 0) -> ImageData:
    """Draws of a correlated Gaussian with a dark mean (like digits' background), on 256 levels,
    clipped to [-1, 1] (rarely: the data's mean, which is all the split's means need of the
    Wiener denoiser, stays the fitted one)."""
    rng = np.random.default_rng(seed)
    d = SIDE * SIDE
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    cov = rotation @ np.diag(np.linspace(0.005, 0.12, d)) @ rotation.T
    mu = rng.uniform(-0.6, -0.2, d)
    x = rng.multivariate_normal(mu, cov, size=n_train + n_heldout).clip(-1, 1)
    levels = np.round((x + 1) / 2 * (LEVELS - 1)).astype(np.uint8).reshape(-1, 1, SIDE, SIDE)
    images = torch.from_numpy(levels)
    return ImageData("gaussian", images[:n_train], images[n_train:], LEVELS)


def _parts(preset: str, diffusion: dict, data: ImageData, num_samples: int):
    config = ExperimentConfig.from_dict(
        {
            "model": {"preset": preset},
            "diffusion": diffusion,
            "sample": {"num_samples": num_samples},
            "eval": {"probe_images": 32, "probe_timesteps": 8, "quality": False, "drift_hist_steps": 3},
        }
    )
    return build(config, torch.device("cpu"), data)


def _pixel_means_along(parts, denoiser, start_x0=None) -> tuple[list[int], torch.Tensor]:
    """(t, per-sample pixel means: one row per visited t) of run_sampler's chain."""
    ts, rows = [], []
    run_sampler(
        parts, denoiser, None, lambda t, x: (ts.append(t), rows.append(x.flatten(1).double().mean(1))), start_x0
    )
    return ts, torch.stack(rows)


def _image_means(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double().mean(1)


SCHEDULES = {
    # unscaled betas at T = 200: alphabar_T = 0.13, x_T keeps a third of the image
    "start_mismatch": {"T": 200, "beta_scaling": "none"},
    # betas scaled by 1000 / T: alphabar_T ~ 5e-5, x_T is noise
    "no_mismatch": {"T": 200, "beta_scaling": "by_T"},
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_gaussian_data_with_its_wiener_denoiser_splits_into_the_closed_form_start_and_no_own_drift(name):
    data = _gaussian_images(n_train=2000, n_heldout=1000)
    parts = _parts("gaussian", SCHEDULES[name], data, num_samples=1000)
    sampled = sample_with_drift(parts)
    summary = drift_summary(sampled.drift, sampled.x0, sampled.drift_reference)
    n = parts.config.sample.num_samples
    abar_T = float(parts.schedule.alphabar[-1])
    train_means = _image_means(data.to_model_space(data.train))
    held_means = _image_means(data.to_model_space(data.heldout))

    # the identity the split is built for, to float64 round-off
    assert summary["final_mean_gap"] == pytest.approx(
        summary["start_final_mean_gap"] + summary["own_final_mean_gap"], abs=1e-12
    )

    # the start gap at t = T is the two x_T's difference with the same eps: no draw noise left
    eps = torch.randn(sampled.x0.shape, generator=torch.Generator().manual_seed(parts.config.sample_draw_seed))
    start_x0 = heldout_start(parts)
    want = float(((1 - math.sqrt(1 - abar_T)) * eps - math.sqrt(abar_T) * start_x0).double().mean())
    assert summary["start_prior_mean_gap"] == pytest.approx(want, abs=1e-6)

    # own drift: the chain from q(x_T) against q(x_t), within its sampling noise
    ts, own_means = _pixel_means_along(parts, parts.denoiser, start_x0)
    np.testing.assert_allclose(own_means.mean(1).numpy(), sampled.drift["qstart_mean"].to_numpy(), atol=1e-5)
    drift = sampled.drift.set_index("t")
    abar = np.array([1.0 if t == 0 else float(parts.schedule.alphabar[t - 1]) for t in ts])
    # noise of the chain's mean, of the held-out mean it is compared with, and of the fitted mean
    se = np.sqrt(
        own_means.var(1).numpy() / n
        + abar * (held_means.var().item() / len(held_means))
        + train_means.var().item() / len(train_means)
    )
    z = (own_means.mean(1).numpy() - drift.loc[ts, "q_mean"].to_numpy()) / se
    assert np.abs(z).max() < 5, (name, np.abs(z).max())
    assert abs(summary["own_final_mean_gap"]) < 4 * se[-1]
    assert summary["own_max_mean_gap"] < 5 * se.max()

    # the start's share against the closed form of the same schedule and sampler
    check = check_config(parts.config.diffusion, parts.config.sample, data.to_model_space(data.train))
    closed = float(check["chain"]["chain_mean"].iloc[-1] - check["chain"]["forward_mean"].iloc[-1])
    _, start_means = _pixel_means_along(parts, parts.denoiser)
    paired = start_means[-1] - own_means[-1]  # per sample: common random numbers
    se_start = math.sqrt(paired.var().item() / n + abar_T * train_means.var().item() / len(train_means))
    assert summary["start_final_mean_gap"] == pytest.approx(float(paired.mean()), abs=1e-6)
    assert abs(summary["start_final_mean_gap"] - closed) < 4 * se_start + 1e-6, (closed, summary)
    if name == "start_mismatch":  # a real mismatch, carried to the end and measured outside the noise
        assert summary["start_prior_mean_gap"] > 0.1 and abs(closed) > 5 * se_start
    else:
        assert abs(summary["start_prior_mean_gap"]) < 0.01 and abs(closed) < 1e-4

    # a denoiser whose data mean is off by +0.1 drifts on its own, far outside that noise
    shifted = build_reference("gaussian", parts.schedule, data.to_model_space(data.train) + 0.1, LEVELS)
    biased = drift_summary(sample_with_drift(dataclasses.replace(parts, model=shifted)).drift, sampled.x0, sampled.x0)
    assert biased["own_final_mean_gap"] > 20 * se[-1]


def test_the_training_sets_exact_optimum_started_from_its_own_q_has_no_own_drift():
    """The empirical denoiser (the exact optimum for the training set) run from q(x_T | x_0) of
    the training images: every step maps the mean of q(x_t) of those images to that of
    q(x_{t-1}), so the chain's mean is theirs along the whole chain, to sampling noise. From
    x_T ~ N(0, I) at alphabar_T = 0.13 (unscaled T = 200) it is not: the same test fails."""
    data = _gaussian_images(n_train=100, n_heldout=50, seed=3)
    parts = _parts("empirical", SCHEDULES["start_mismatch"], data, num_samples=500)
    train = data.to_model_space(data.train)
    start_x0 = train[torch.arange(500) % len(train)]  # five times each: their mean is the training mean
    train_mean = float(_image_means(train).mean())
    ts, means = _pixel_means_along(parts, parts.denoiser, start_x0)
    abar = np.array([1.0 if t == 0 else float(parts.schedule.alphabar[t - 1]) for t in ts])
    gap = means.mean(1).numpy() - np.sqrt(abar) * train_mean
    se = np.sqrt(means.var(1).numpy() / len(start_x0))
    assert np.abs(gap / se).max() < 5, np.abs(gap / se).max()
    _, from_noise = _pixel_means_along(parts, parts.denoiser)
    gap = from_noise.mean(1).numpy() - np.sqrt(abar) * train_mean
    assert np.abs(gap / np.sqrt(from_noise.var(1).numpy() / len(start_x0))).max() > 8
