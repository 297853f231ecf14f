"""Reference denoisers: each is checked against its closed form, computed independently in numpy."""

import numpy as np
import pandas as pd
import pytest
import torch

from ddpm_engine.config import DataConfig, DiffusionConfig
from ddpm_engine.data import load_data
from ddpm_engine.diagnostics import per_t_probe
from ddpm_engine.references import (
    REFERENCES,
    EmpiricalDenoiser,
    GaussianDenoiser,
    MedianDenoiser,
    PixelwiseDenoiser,
    build_reference,
)
from ddpm_engine.sampling import sample
from ddpm_engine.schedule import Schedule, make_schedule


@pytest.fixture(scope="module")
def schedule():
    # DDPM's linear 1e-4..0.02, T = 1000: 1 - abar_1 = 1e-4, noise std 0.01 at t = 1
    return make_schedule(DiffusionConfig(T=1000))


def _gaussian(dim: int, seed: int):
    """A known, strongly correlated Gaussian: random rotation of spread eigenvalues."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    lam = np.logspace(-3, 0, dim)
    return rng.uniform(-0.5, 0.5, dim), rotation @ np.diag(lam) @ rotation.T, rng


def _draw(rng, mu, sigma, n, side):
    x = rng.multivariate_normal(mu, sigma, size=n)
    return torch.from_numpy(x.reshape(n, 1, side, side))


def _numpy_wiener(x, abar, mu, sigma):
    """E[x0 | x_t] of N(mu, Sigma) per row: mu + Sigma s (abar Sigma + (1-abar) I)^{-1} (x - s mu)."""
    out = np.empty_like(x)
    for i, (row, a) in enumerate(zip(x, abar)):
        s = np.sqrt(a)
        cov_xt = a * sigma + (1 - a) * np.eye(len(mu))
        out[i] = mu + s * sigma @ np.linalg.solve(cov_xt, row - s * mu)
    return out


def _probe_loss(model, schedule, x0, noise, ts, levels=256):
    frame = per_t_probe(model, schedule, x0.float(), noise.float(), ts, sigma="beta", levels=levels)
    return frame["loss_mse"].to_numpy()


# ---- GaussianDenoiser


def test_gaussian_is_the_closed_form_posterior_mean(schedule):
    mu, sigma, rng = _gaussian(4, seed=0)
    train = _draw(rng, mu, sigma, 5000, side=2)
    model = GaussianDenoiser(schedule, train)
    flat = train.flatten(1).numpy()
    fitted_mu, fitted_sigma = flat.mean(0), np.cov(flat, rowvar=False, bias=True)
    np.testing.assert_allclose(model.mean.numpy(), fitted_mu, atol=1e-12)
    np.testing.assert_allclose(model.cov.numpy(), fitted_sigma, atol=1e-12)
    assert model.approximation == ""

    xt = torch.from_numpy(rng.standard_normal((64, 1, 2, 2)))
    t = torch.from_numpy(rng.integers(1, schedule.T + 1, 64))
    abar = schedule.alphabar[t - 1].numpy()
    expected_x0 = _numpy_wiener(xt.flatten(1).numpy(), abar, fitted_mu, fitted_sigma)
    np.testing.assert_allclose(model.posterior_mean(xt, t).flatten(1).numpy(), expected_x0, rtol=0, atol=1e-8)

    # DDPM eq. 4 solved for eps, from the numpy x0; forward returns float32
    expected_eps = (xt.flatten(1).numpy() - np.sqrt(abar)[:, None] * expected_x0) / np.sqrt(1 - abar)[:, None]
    eps = model(xt.float(), t)
    assert eps.dtype == torch.float32 and eps.shape == xt.shape
    np.testing.assert_allclose(eps.flatten(1).numpy(), expected_eps, rtol=1e-5, atol=1e-5)

    # the affine map the sampler check uses is the same function, in float64
    for t_now in (1, 37, 500, 1000):
        a, b = model.linear_map(t_now)
        assert a.shape == (4, 4) and b.shape == (4,) and a.dtype == torch.float64
        rows = xt.flatten(1)
        ab = schedule.alphabar[t_now - 1].item()
        want = (rows.numpy() - np.sqrt(ab) * _numpy_wiener(rows.numpy(), [ab] * 64, fitted_mu, fitted_sigma)) / np.sqrt(
            1 - ab
        )
        np.testing.assert_allclose((rows @ a.T + b).numpy(), want, rtol=0, atol=1e-8)
        np.testing.assert_allclose(
            model(xt.float(), torch.full((64,), t_now)).flatten(1).numpy(), (rows @ a.T + b).numpy(), atol=1e-5
        )


def test_gaussian_probe_loss_is_the_closed_form_mmse(schedule):
    """On fresh draws of N(mu, Sigma), E||eps_hat - eps||^2 / D = mean_j abar lam_j / (abar lam_j + 1 - abar).

    eps and x_t = sqrt(abar) x0 + sqrt(1-abar) eps are jointly Gaussian with Cov(eps, x_t) =
    sqrt(1-abar) I, so Cov(eps | x_t) = I - (1-abar)(abar Sigma + (1-abar) I)^{-1}, whose
    eigenvalues are 1 - (1-abar)/(abar lam + 1-abar) = abar lam / (abar lam + 1-abar).
    """
    mu, sigma, rng = _gaussian(16, seed=1)
    model = GaussianDenoiser(schedule, _draw(rng, mu, sigma, 20000, side=4))
    x0 = _draw(rng, mu, sigma, 20000, side=4)
    noise = torch.from_numpy(rng.standard_normal(x0.shape))
    ts = [5, 50, 200, 500]
    lam = np.linalg.eigvalsh(sigma)
    abar = schedule.alphabar[torch.tensor(ts) - 1].numpy()[:, None]
    mmse = (abar * lam / (abar * lam + 1 - abar)).mean(1)
    loss = _probe_loss(model, schedule, x0, noise, ts)
    np.testing.assert_allclose(loss, mmse, rtol=0.02)

    # the per-pixel (diagonal) approximation ignores the correlations and is measurably worse
    diagonal = GaussianDenoiser(schedule, _draw(rng, mu, sigma, 20000, side=4), max_full_dim=8)
    assert diagonal.approximation == "diagonal covariance (D > max_full_dim)"
    assert diagonal.cov.shape == (16,)
    # (at t <= 200; by t = 500 the prior dominates and both are near the same small loss)
    assert np.all(_probe_loss(diagonal, schedule, x0, noise, ts[:3]) > 1.05 * mmse[:3])


def test_gaussian_diagonal_is_the_per_pixel_wiener_filter(schedule):
    mu, sigma, rng = _gaussian(16, seed=2)
    train = _draw(rng, mu, sigma, 3000, side=4)
    model = GaussianDenoiser(schedule, train, max_full_dim=15)
    flat = train.flatten(1).numpy()
    var = flat.var(0)
    np.testing.assert_allclose(model.cov.numpy(), var, atol=1e-12)
    xt = torch.from_numpy(rng.standard_normal((8, 1, 4, 4)))
    ab = schedule.alphabar[99].item()
    want = flat.mean(0) + np.sqrt(ab) * var / (ab * var + 1 - ab) * (xt.flatten(1).numpy() - np.sqrt(ab) * flat.mean(0))
    got = model.posterior_mean(xt, torch.full((8,), 100))
    np.testing.assert_allclose(got.flatten(1).numpy(), want, atol=1e-10)
    a, b = model.linear_map(100)
    assert torch.count_nonzero(a - torch.diag(torch.diagonal(a))) == 0
    np.testing.assert_allclose(
        (xt.flatten(1) @ a.T + b).numpy(), model(xt.float(), torch.full((8,), 100)).flatten(1).numpy(), atol=1e-5
    )


# ---- PixelwiseDenoiser


def test_pixelwise_matches_bayes_rule_per_pixel(schedule):
    """Three pixels with different level histograms (one level never seen) against numpy Bayes."""
    levels = 5
    rng = np.random.default_rng(3)
    probs = np.array([[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2, 0.2]])
    counts_k = np.stack([rng.choice(levels, size=400, p=p) for p in probs], axis=1)  # 400 x 3
    train = torch.from_numpy(-1 + 2 * counts_k / (levels - 1)).view(400, 1, 1, 3).float()
    model = PixelwiseDenoiser(schedule, train, levels)

    values = -1 + 2 * np.arange(levels) / (levels - 1)
    empirical = np.stack([np.bincount(counts_k[:, j], minlength=levels) / 400 for j in range(3)])
    xt = rng.standard_normal((50, 3)) * 1.2
    for t_now in (30, 150, 400):
        ab = schedule.alphabar[t_now - 1].item()
        log_w = np.log(np.maximum(empirical, 1e-12))[None] - (xt[:, :, None] - np.sqrt(ab) * values) ** 2 / (
            2 * (1 - ab)
        )
        w = np.exp(log_w - log_w.max(2, keepdims=True))
        want = (w * values).sum(2) / w.sum(2)
        got = model.posterior_mean(torch.from_numpy(xt).view(50, 1, 1, 3), torch.full((50,), t_now))
        np.testing.assert_allclose(got.view(50, 3).numpy(), want, rtol=0, atol=1e-10)


def test_pixelwise_is_exact_on_two_levels_at_tiny_noise(schedule):
    rng = np.random.default_rng(4)
    p_on = rng.uniform(0.05, 0.95, 16)
    train = torch.from_numpy(np.where(rng.uniform(size=(2000, 16)) < p_on, 1.0, -1.0)).view(2000, 1, 4, 4).float()
    x0 = torch.from_numpy(np.where(rng.uniform(size=(2000, 16)) < p_on, 1.0, -1.0)).view(2000, 1, 4, 4).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    model = PixelwiseDenoiser(schedule, train, levels=2)
    loss = _probe_loss(model, schedule, x0, noise, [1, 2], levels=2)
    assert loss[0] < 1e-6 and loss[1] < 1e-6, loss


def test_pixelwise_on_digits_at_t1_is_near_zero(schedule):
    data = load_data(DataConfig())
    model = PixelwiseDenoiser(schedule, data.to_model_space(data.train), data.levels)
    heldout = data.to_model_space(data.heldout)[:180]
    noise = torch.randn(heldout.shape, generator=torch.Generator().manual_seed(0))
    # noise std sqrt(beta_1) = 0.01 is far below half a grey level (0.0625): the level is known
    assert _probe_loss(model, schedule, heldout, noise, [1], levels=data.levels)[0] < 1e-4


# ---- EmpiricalDenoiser


def test_empirical_recovers_the_noise_of_a_training_image(schedule):
    rng = np.random.default_rng(5)
    train = torch.from_numpy(rng.uniform(-1, 1, (20, 1, 4, 4))).float()
    model = EmpiricalDenoiser(schedule, train)
    eps = torch.randn(train.shape, generator=torch.Generator().manual_seed(1))
    for t_now in (1, 5):
        t = torch.full((20,), t_now)
        ab = schedule.alphabar[t_now - 1]
        xt = (ab.sqrt() * train + (1 - ab).sqrt() * eps).float()
        assert (model(xt, t) - eps).abs().max() < 1e-4


def test_empirical_is_the_softmax_over_training_images(schedule):
    rng = np.random.default_rng(6)
    train = rng.uniform(-1, 1, (37, 6))
    model = EmpiricalDenoiser(schedule, torch.from_numpy(train).view(37, 1, 2, 3).float())
    # a budget of 12 float64s streams the log-sum-exp over training chunks of 2 images
    streamed = EmpiricalDenoiser(schedule, torch.from_numpy(train).view(37, 1, 2, 3).float(), chunk_elements=12)
    train = train.astype(np.float32).astype(np.float64)  # the model stores the training set in float32
    xt = rng.standard_normal((9, 6))
    t = torch.from_numpy(rng.integers(1, 600, 9))
    abar = schedule.alphabar[t - 1].numpy()[:, None]
    sq_dist = ((xt[:, None, :] - np.sqrt(abar)[:, :, None] * train[None]) ** 2).sum(2)
    logits = -sq_dist / (2 * (1 - abar))
    w = np.exp(logits - logits.max(1, keepdims=True))
    want = (w / w.sum(1, keepdims=True)) @ train
    for m in (model, streamed):
        got = m.posterior_mean(torch.from_numpy(xt).view(9, 1, 2, 3), t).view(9, 6).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_empirical_ddpm_samples_reproduce_training_images():
    schedule = Schedule(torch.linspace(1e-4, 0.2, 50, dtype=torch.float64))
    rng = np.random.default_rng(7)
    train = torch.from_numpy(rng.uniform(-1, 1, (20, 1, 4, 4))).float()
    model = EmpiricalDenoiser(schedule, train)
    out = sample(model, schedule, (64, 1, 4, 4), generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    gap = (out[:, None] - train[None]).abs().flatten(2).amax(2)  # 64 x 20 max-abs distances
    nearest = gap.min(1)
    assert nearest.values.max() < 1e-3, nearest.values.max()
    assert len(set(nearest.indices.tolist())) >= 5  # it samples the training set, not one image


# ---- MedianDenoiser


def _numpy_median3x3(x):
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.median(windows.reshape(*x.shape, 9), axis=-1)


def test_median_on_a_constant_image_predicts_noise_minus_its_local_median(schedule):
    """x_t = s c + sigma eps: median(x_t / s) = c + (sigma / s) median(eps), so eps_hat = eps - median3x3(eps)."""
    eps = torch.randn(200, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    ab = schedule.alphabar[0]
    xt = (ab.sqrt() * 0.3 + (1 - ab).sqrt() * eps).float()
    model = MedianDenoiser(schedule)
    got = model(xt, torch.ones(200, dtype=torch.long))
    np.testing.assert_allclose(got.numpy(), eps.numpy() - _numpy_median3x3(eps.numpy()), atol=1e-4)
    # the filter's error: the median of 9 normals has variance ~pi/18 = 0.17, far from 1 (eps_hat = 0)
    loss = float(((got - eps) ** 2).mean())
    assert 0.1 < loss < 0.25
    # clipped to the data range: an x_t far outside [-1, 1] has x0_hat = 1
    assert model.posterior_mean(torch.full((1, 1, 3, 3), 5.0), torch.ones(1, dtype=torch.long)).max() == 1.0


# ---- all references


def _small_data():
    rng = np.random.default_rng(8)
    levels = rng.integers(0, 17, (30, 3, 4, 4))
    return torch.from_numpy(-1 + 2 * levels / 16).float()


@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_reference_is_a_parameter_free_eps_model(name, schedule):
    train = _small_data()
    model = build_reference(name, schedule, train, levels=17)
    assert isinstance(model, REFERENCES[name]) and isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) == 0
    xt = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 2, 100, 999, 1000])
    eps = model(xt, t)
    assert eps.shape == xt.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    # every row uses its own t: row 2 alone gives the same answer
    torch.testing.assert_close(model(xt[2:3], t[2:3]), eps[2:3])
    # chunking is invisible: a budget of a few float64s processes one image (or level row) at a time
    small = build_reference(name, schedule, train, levels=17)
    small.chunk_elements = 7
    torch.testing.assert_close(small(xt, t), eps)
    with pytest.raises(ValueError, match="1..1000"):
        model(xt, torch.tensor([0, 1, 1, 1, 1]))


@pytest.mark.parametrize("name", ["pixelwise", "gaussian", "empirical"])
def test_fitted_references_refuse_uint8_levels(name, schedule):
    with pytest.raises(ValueError, match="model space"):
        build_reference(name, schedule, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), levels=17)


def test_build_reference_rejects_an_unknown_name(schedule):
    with pytest.raises(ValueError, match=r"'gausian'.*empirical.*gaussian.*median.*pixelwise"):
        build_reference("gausian", schedule, _small_data(), levels=17)


def test_reference_losses_best_ref_is_the_lowest_and_is_cached(tmp_path, monkeypatch):
    """The per-t best reference is the minimum over the references, computed once per (split, schedule,
    probe draw, grid) and then read back from the cache without fitting anything."""
    from ddpm_engine import diagnostics
    from ddpm_engine.metrics import REFERENCE_NAMES

    gen = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 5, (40, 1, 4, 4), generator=gen).double() / 2 - 1).float()
    probe = (torch.randint(0, 5, (12, 1, 4, 4), generator=gen).double() / 2 - 1).float()
    noise = torch.randn(probe.shape, generator=gen)
    schedule = Schedule(torch.linspace(1e-4, 0.2, 30, dtype=torch.float64))
    grid = [1, 5, 15, 30]
    first = diagnostics.reference_losses(schedule, train, 5, probe, noise, grid, cache_dir=tmp_path)
    losses = first[[f"ref_loss_{n}" for n in REFERENCE_NAMES]].to_numpy()
    assert list(first["t"]) == grid
    np.testing.assert_allclose(first["loss_best_ref"], losses.min(axis=1))
    assert list(first["best_ref_denoiser"]) == [REFERENCE_NAMES[i] for i in losses.argmin(axis=1)]
    assert first.loc[0, "best_ref_denoiser"] == "pixelwise" and first.loc[0, "loss_best_ref"] < 1e-6  # 5 levels, t = 1
    assert len(list(tmp_path.glob("reference_losses-*.parquet"))) == 1

    diagnostics._REFERENCE_MEMO.clear()
    monkeypatch.setattr("ddpm_engine.references.build_reference", lambda *a, **k: pytest.fail("refitted"))
    again = diagnostics.reference_losses(schedule, train, 5, probe, noise, grid, cache_dir=tmp_path)
    assert again.equals(first)
    other = noise + 1e-3  # another probe draw is another entry, not a stale hit
    with pytest.raises(pytest.fail.Exception):
        diagnostics.reference_losses(schedule, train, 5, probe, other, grid, cache_dir=tmp_path)


def test_a_reference_cache_file_swapped_with_another_inputs_file_is_not_believed(tmp_path):
    """The cache is looked up by file name; a file another split or draw computed, copied or
    swapped into that name, is recomputed instead of giving its losses silently."""
    from ddpm_engine import diagnostics

    gen = torch.Generator().manual_seed(1)
    train = (torch.randint(0, 5, (40, 1, 4, 4), generator=gen).double() / 2 - 1).float()
    probe = (torch.randint(0, 5, (12, 1, 4, 4), generator=gen).double() / 2 - 1).float()
    noise, other = torch.randn(probe.shape, generator=gen), torch.randn(probe.shape, generator=gen)
    schedule = Schedule(torch.linspace(1e-4, 0.2, 30, dtype=torch.float64))
    grid = [1, 5, 15, 30]
    mine = diagnostics.reference_losses(schedule, train, 5, probe, noise, grid, cache_dir=tmp_path / "a")
    theirs = diagnostics.reference_losses(schedule, train, 5, probe, other, grid, cache_dir=tmp_path / "b")
    assert not np.allclose(mine["ref_loss_gaussian"], theirs["ref_loss_gaussian"])
    (my_file,) = (tmp_path / "a").glob("reference_losses-*.parquet")
    (their_file,) = (tmp_path / "b").glob("reference_losses-*.parquet")
    my_file.write_bytes(their_file.read_bytes())  # the swap
    diagnostics._REFERENCE_MEMO.clear()
    again = diagnostics.reference_losses(schedule, train, 5, probe, noise, grid, cache_dir=tmp_path / "a")
    pd.testing.assert_frame_equal(again, mine)


def test_a_gaussian_arm_is_its_own_gauss_chain_and_shares_the_start_with_a_unet():
    """The gauss_chain reference curve is the data's Gaussian denoiser from the arm's own x_T
    and noise: a `gaussian` reference arm IS that chain. x_T and its q(x_T | x_0) twin do not
    depend on the model, so the start gap at t = T is the same for every arm."""
    from ddpm_engine import ExperimentConfig, MemoryRecorder, run_experiment

    def run(preset: str):
        config = ExperimentConfig.from_dict(
            {
                "model": {"preset": preset, "base_channels": 16, "time_embed_dim": 32},
                "diffusion": {"T": 20},
                "train": {"steps": 2, "batch_size": 16, "log_every": 1, "warmup_steps": 1},
                "sample": {"num_samples": 16},
                "eval": {"probe_every": 2, "probe_images": 16, "quality": False, "drift_hist_steps": 3},
            }
        )
        recorder = MemoryRecorder()
        return run_experiment(config, recorder, device="cpu").summary, recorder.tables["drift"]

    wiener, wiener_drift = run("gaussian")
    np.testing.assert_allclose(wiener_drift["mean"], wiener_drift["gauss_chain_mean"], atol=1e-6)
    np.testing.assert_allclose(wiener_drift["std"], wiener_drift["gauss_chain_std"], atol=1e-6)
    unet, unet_drift = run("tiny")
    assert np.abs(unet_drift["mean"] - unet_drift["gauss_chain_mean"]).max() > 1e-3
    assert unet["start_prior_mean_gap"] == pytest.approx(wiener["start_prior_mean_gap"], abs=1e-7)
    start = unet_drift[unet_drift["t"] == 20].iloc[0]
    assert unet["start_prior_mean_gap"] == pytest.approx(start["mean"] - start["qstart_mean"])
    for summary in (unet, wiener):
        assert summary["final_mean_gap"] == pytest.approx(
            summary["start_final_mean_gap"] + summary["own_final_mean_gap"], abs=1e-12
        )
