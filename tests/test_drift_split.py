"""The drift split by intervention (docs/design.md, "Drift, split") and the exposure-bias
measures ("Exposure bias"), at engine level, no training.

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
from ddpm_engine.diagnostics import drift_summary, exposure_summary, probe_timesteps
from ddpm_engine.diffusion import q_sample
from ddpm_engine.experiment import build, drift_recorder, forward_eps, heldout_start, run_sampler, sample_with_drift
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


def _parts(preset: str, diffusion: dict, data: ImageData, num_samples: int, probe_images: int = 32):
    config = ExperimentConfig.from_dict(
        {
            "model": {"preset": preset},
            "diffusion": diffusion,
            "sample": {"num_samples": num_samples},
            "eval": {"probe_images": probe_images, "probe_timesteps": 8, "quality": False, "drift_hist_steps": 3},
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


# --- exposure bias (Ning et al. 2024) -----------------------------------------------------------


class _ScaledEps(torch.nn.Module):
    """A denoiser whose every prediction is ``factor`` times another's: a deliberate, known bias."""

    def __init__(self, inner: torch.nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x, t):
        return self.factor * self.inner(x, t)


def _exposure_parts(num_samples: int):
    """Gaussian data, its Wiener denoiser, T = 1000 linear betas: x_T ~ N(0, I) is q(x_T) to
    sqrt(abar_T) = 0.006, and the DDPM chain's discretisation moves the std by about 0.001
    (the sampler check's max_std_gap on digits, tests/test_sampler_check.py), below the noise
    of these samples."""
    data = _gaussian_images(n_train=2000, n_heldout=1000)
    return data, _parts("gaussian", {"T": 1000}, data, num_samples=num_samples, probe_images=1000)


def _exposure(parts, denoiser, per_image: dict | None = None) -> pd.DataFrame:
    """The exposure columns of the drift table, as sample_with_drift makes them, for the sampled
    chain of ``denoiser`` alone (the drift split's two other chains are not needed here).
    ``per_image`` receives, per visited t, each image's mean square of the predicted noise."""

    def seen(t, x, eps):
        drift.observe_eps(t, x, eps)
        if per_image is not None:
            per_image[t] = eps.flatten(1).double().pow(2).mean(1)

    drift = drift_recorder(parts)
    run_sampler(parts, denoiser, None, drift, eps_callback=seen)
    parts = dataclasses.replace(parts, model=denoiser)
    return drift.exposure_table().merge(forward_eps(parts, list(drift.eps_rms)), on="t", how="left")


def _var_of_mean_variance(cov: torch.Tensor, n: int) -> float:
    """Variance of the mean over D pixels of their unbiased sample variances over n draws of
    N(., cov): 2 tr(cov^2) / ((n - 1) D^2) (Wishart second moments)."""
    D = cov.shape[0]
    return float(2 * torch.trace(cov @ cov) / ((n - 1) * D**2))


def test_the_exact_denoisers_chain_is_distributed_as_q_so_it_shows_no_exposure_bias(one_thread):
    """On Gaussian data its exact (Wiener) denoiser's chain visits states distributed as q(x_t):
    the predicted noise's RMS there is that on forward states (ratio 1) and the per-pixel std is
    q(x_t)'s, each within its own sampling noise at every measured t."""
    data, parts = _exposure_parts(num_samples=400)
    chain_sq: dict[int, torch.Tensor] = {}  # per image, on the chain's states
    table = _exposure(parts, parts.denoiser, chain_sq)
    drift = table.set_index("t").sort_index()
    n, n_probe = parts.config.sample.num_samples, len(parts.probe_x0)

    # the predicted noise on forward states at the measured t, per image, against the chain's
    measured = drift.index[drift["q_eps_rms"].notna()].tolist()
    assert measured == probe_timesteps(1000, parts.config.eval.probe_timesteps)  # DDPM visits every t
    tables = parts.schedule.on("cpu")
    z = []
    for t in measured:
        t_vec = torch.full((n_probe,), t, dtype=torch.long)
        forward = parts.denoiser(q_sample(tables, parts.probe_x0, t_vec, parts.probe_noise), t_vec)
        fwd_sq = forward.flatten(1).double().pow(2).mean(1)
        assert drift.loc[t, "eps_rms"] == pytest.approx(float(chain_sq[t].mean().sqrt()), rel=1e-9)
        assert drift.loc[t, "q_eps_rms"] == pytest.approx(float(fwd_sq.mean().sqrt()), rel=1e-6)
        se = math.sqrt(chain_sq[t].var().item() / n + fwd_sq.var().item() / n_probe)
        z.append((chain_sq[t].mean().item() - fwd_sq.mean().item()) / se)
    assert np.abs(z).max() < 5, np.abs(z).max()

    # per-pixel std against q(x_t)'s: noise of the chain's estimate and of the held-out variance
    cov = torch.cov(data.to_model_space(data.train).flatten(1).double().T)
    ts = drift.index.to_numpy()
    abar = np.array([1.0 if t == 0 else float(parts.schedule.alphabar[t - 1]) for t in ts])
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    var_se = np.array(
        [
            math.sqrt(
                _var_of_mean_variance(a * cov + (1 - a) * eye, n) + a**2 * _var_of_mean_variance(cov, len(data.heldout))
            )
            for a in abar
        ]
    )
    q_std = drift["q_per_pixel_std"].to_numpy()
    std_se = var_se / (2 * q_std)  # delta method: sd(sqrt(v)) = sd(v) / (2 sqrt(v))
    gap = drift["per_pixel_std"].to_numpy() - q_std
    assert np.abs(gap / std_se).max() < 5, np.abs(gap / std_se).max()

    summary = exposure_summary(table)
    assert abs(summary["chain_std_gap_end"]) < 5 * std_se[0]
    assert abs(summary["chain_std_gap_mean"]) < 5 * std_se.max()
    assert abs(summary["eps_norm_excess_end"]) < 0.02 and abs(summary["eps_norm_excess_mean"]) < 0.02
    # the reference is the marginal's: at t = 0 the held-out per-pixel std, not sqrt(1 - abar_0) = 0
    held_out = data.to_model_space(data.heldout).flatten(1).double()
    assert drift.loc[0, "q_per_pixel_std"] == pytest.approx(float(held_out.var(0).mean().sqrt()), rel=1e-9)
    assert drift.loc[1000, "q_per_pixel_std"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("factor, sign", [(1.05, -1), (0.95, +1)], ids=["eps_too_large", "eps_too_small"])
def test_a_denoiser_with_a_known_bias_moves_the_exposure_measures_the_predicted_way(factor, sign, one_thread):
    """Every predicted noise times 1.05 removes too much noise at every step: the chain's states
    spread less than q(x_t)'s, and the same (scaled) network predicts less noise on them than on
    forward states; times 0.95 the opposite. Against the exact denoiser on the same draws (common
    random numbers), both measures move far beyond the noise the exact chain shows above."""
    _, parts = _exposure_parts(num_samples=200)
    exact = exposure_summary(_exposure(parts, parts.denoiser))
    biased = exposure_summary(_exposure(parts, _ScaledEps(parts.denoiser, factor)))
    moved = {name: sign * (biased[name] - exact[name]) for name in exact}
    # observed: the excess ratio and the std gap along the chain move by 0.04-0.05, the std gap at
    # t = 0 by 0.012-0.014 (the last steps' small betas undo part of it); the exact chain's own
    # values, noise included, stay within 0.013 of 0
    assert moved["eps_norm_excess_end"] > 0.02 and moved["eps_norm_excess_mean"] > 0.02, moved
    assert moved["chain_std_gap_mean"] > 0.02 and moved["chain_std_gap_end"] > 0.006, moved
