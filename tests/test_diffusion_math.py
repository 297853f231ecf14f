"""The DDPM math: identities that hold exactly, and agreement with diffusers' reference."""

import math

import numpy as np
import pytest
import torch

from ddpm_engine.config import DiffusionConfig
from ddpm_engine.diffusion import (
    discretized_gaussian_log_likelihood,
    mean_from_eps,
    normal_kl,
    prior_kl_bits,
    q_posterior,
    q_sample,
    vlb_term_bits,
    x0_from_eps,
)
from ddpm_engine.sampling import ddim_step, ddpm_step, sample
from ddpm_engine.schedule import cosine_betas, linear_betas, make_schedule

SCHEDULES = {
    "linear": DiffusionConfig(T=1000, schedule="linear"),
    "cosine": DiffusionConfig(T=1000, schedule="cosine"),
    "linear_T200_by_T": DiffusionConfig(T=200, beta_scaling="by_T"),
}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    return make_schedule(SCHEDULES[request.param])


def test_schedule_identities(schedule):
    assert schedule.betas.dtype == torch.float64
    torch.testing.assert_close(schedule.alphabar, torch.cumprod(1 - schedule.betas, 0))
    torch.testing.assert_close(schedule.alphabar_prev[1:], schedule.alphabar[:-1])
    assert schedule.alphabar_prev[0] == 1.0
    c0, ct = schedule.posterior_mean_coef_x0, schedule.posterior_mean_coef_xt
    # Variance of x_{t-1} decomposes: Var = ct^2 Var(x_t|x0) + beta_tilde  (x0 fixed)
    lhs = 1 - schedule.alphabar_prev
    rhs = ct**2 * (1 - schedule.alphabar) + schedule.posterior_variance
    torch.testing.assert_close(lhs, rhs)
    # and the mean: sqrt(abar_{t-1}) = c0 + ct sqrt(abar_t)
    torch.testing.assert_close(schedule.alphabar_prev.sqrt(), c0 + ct * schedule.alphabar.sqrt())
    assert torch.all(schedule.posterior_variance[1:] <= schedule.betas[1:] + 1e-15)


def test_linear_beta_scaling():
    fixed = linear_betas(200, 1e-4, 0.02, "none")
    scaled = linear_betas(200, 1e-4, 0.02, "by_T")
    assert fixed[0] == pytest.approx(1e-4) and fixed[-1] == pytest.approx(0.02)
    assert scaled[0] == pytest.approx(5e-4) and scaled[-1] == pytest.approx(0.1)
    # a fixed short schedule never reaches noise; the scaled one does
    assert torch.cumprod(1 - fixed, 0)[-1] > 0.1
    assert torch.cumprod(1 - scaled, 0)[-1] < 1e-4
    with pytest.raises(ValueError):
        linear_betas(10, 1e-4, 0.02, "by_T")  # beta_end 2.0 is impossible


def test_cosine_cap_matters():
    assert cosine_betas(1000, max_beta=0.999)[-1] == pytest.approx(0.999)
    assert cosine_betas(1000, max_beta=0.9999)[-1] == pytest.approx(0.9999)
    # Improved DDPM eq. 17: alphabar follows the squared cosine before the cap binds
    betas = cosine_betas(1000)
    alphabar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, 1001, dtype=torch.float64)
    f = torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(alphabar[:900], f[:900])


def test_q_sample_moments(schedule):
    tables = schedule.on("cpu")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t_val in (1, schedule.T // 2, schedule.T):
        t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
        xt = q_sample(tables, x0, t, torch.randn(x0.shape, generator=gen))
        abar = float(schedule.alphabar[t_val - 1])
        assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
        assert float(xt.var()) == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


def test_eps_and_x0_round_trip(schedule):
    tables = schedule.on("cpu")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.randint(1, schedule.T + 1, (16,), generator=gen)
    xt = q_sample(tables, x0, t, eps)
    torch.testing.assert_close(x0_from_eps(tables, xt, t, eps), x0, atol=2e-3, rtol=1e-3)
    # eq. 11 (mean from eps) equals the posterior mean (eq. 7) at the true x_0
    post_mean, _, _ = q_posterior(tables, x0, xt, t)
    torch.testing.assert_close(mean_from_eps(tables, xt, t, eps), post_mean, atol=1e-4, rtol=1e-4)


def test_normal_kl_matches_closed_form():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    lv1, lv2 = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-5, rtol=1e-5)


def test_vlb_term_is_zero_for_a_perfect_model_and_kl_otherwise(schedule):
    tables = schedule.on("cpu")
    logvar = schedule.posterior_log_variance_clipped.float()
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 17, (8, 1, 4, 4), generator=gen).float() / 16) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.full((8,), schedule.T // 2, dtype=torch.long)
    xt = q_sample(tables, x0, t, eps)
    # with beta_tilde and the true eps the model's reverse step is the posterior: KL = 0
    assert vlb_term_bits(tables, x0, xt, t, eps, logvar, 17).abs().max() < 1e-3
    # a biased prediction: KL equals the Gaussian KL in closed form, in bits/dim
    bits = vlb_term_bits(tables, x0, xt, t, eps + 0.3, logvar, 17)
    mean_true, _, lv_true = q_posterior(tables, x0, xt, t)
    mean_model = mean_from_eps(tables, xt, t, eps + 0.3)
    lv = logvar[t - 1].view(-1, 1, 1, 1)
    closed = 0.5 * (mean_true - mean_model) ** 2 / lv.exp()  # equal variances: KL = (dmu)^2/(2 var)
    torch.testing.assert_close(bits, closed.flatten(1).mean(1) / math.log(2), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("levels", [17, 256])
def test_l0_probabilities_sum_to_one(levels):
    values = torch.linspace(-1, 1, levels)
    for mean, log_scale in [(0.0, -2.0), (0.37, -4.0), (-0.9, 0.0), (1.2, -1.0)]:
        m = torch.full_like(values, mean)
        s = torch.full_like(values, log_scale)
        p = discretized_gaussian_log_likelihood(values, m, s, levels).double().exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)


def test_prior_bits_of_the_fixed_short_schedule_is_large():
    x0 = torch.full((4, 1, 8, 8), 0.5)
    long = make_schedule(DiffusionConfig(T=1000))
    short = make_schedule(DiffusionConfig(T=200))
    assert float(prior_kl_bits(long.on("cpu"), x0).mean()) < 1e-3
    abar = float(short.alphabar[-1])  # 0.132: the fixed T=200 chain ends far from noise
    mean2, var = abar * 0.25, 1 - abar
    closed_nats = 0.5 * (-math.log(var) + var + mean2 - 1)
    assert float(prior_kl_bits(short.on("cpu"), x0).mean()) == pytest.approx(closed_nats / math.log(2), rel=1e-4)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_wt_weights_match_the_formula(schedule, sigma):
    wt = schedule.vlb_weights(sigma)
    for t in (1, 2, 10, schedule.T // 2, schedule.T):
        b, a, ab = schedule.betas[t - 1], 1 - schedule.betas[t - 1], schedule.alphabar[t - 1]
        if sigma == "beta":
            s2 = b
        else:
            tt = max(t, 2)  # beta_tilde_1 = 0 is clipped to beta_tilde_2
            s2 = (1 - schedule.alphabar[tt - 2]) / (1 - schedule.alphabar[tt - 1]) * schedule.betas[tt - 1]
        assert float(wt[t - 1]) == pytest.approx(float(b**2 / (2 * s2 * a * (1 - ab))), rel=1e-9)
    if sigma == "beta":
        assert float(wt[0]) == pytest.approx(1 / (2 * float(schedule.alphas[0])), rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sigma,variance_type", [("beta", "fixed_large"), ("beta_tilde", "fixed_small")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_equals_diffusers(kind, sigma, variance_type, clip):
    diffusers = pytest.importorskip("diffusers")
    T = 1000
    ours = make_schedule(DiffusionConfig(T=T, schedule=kind))
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2",
        variance_type=variance_type,
        clip_sample=clip,
    )
    tables = ours.on("cpu")
    sigma2 = ours.reverse_variance(sigma).float()
    gen = torch.Generator().manual_seed(4)
    for t_val in (1, 2, 17, 500, 999, 1000):
        xt = torch.randn(6, 1, 8, 8, generator=gen)
        eps = torch.randn(6, 1, 8, 8, generator=gen)
        expected = theirs.step(eps, t_val - 1, xt, generator=torch.Generator().manual_seed(t_val)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t_val))
        t = torch.full((6,), t_val, dtype=torch.long)
        got = ddpm_step(tables, sigma2, xt, t, eps, z, clip_x0=clip)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def test_ddim_eta0_is_deterministic_and_eta1_is_the_ddpm_posterior():
    sched = make_schedule(DiffusionConfig(T=100))
    tables = sched.on("cpu")
    gen = torch.Generator().manual_seed(5)
    xt, eps = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(4, 1, 4, 4, generator=gen)
    t, t_prev = torch.full((4,), 50), torch.full((4,), 49)
    a = ddim_step(tables, xt, t, t_prev, eps, 0.0, torch.randn(xt.shape, generator=gen))
    b = ddim_step(tables, xt, t, t_prev, eps, 0.0, torch.randn(xt.shape, generator=gen))
    torch.testing.assert_close(a, b)
    z = torch.randn(xt.shape, generator=gen)
    ddim = ddim_step(tables, xt, t, t_prev, eps, 1.0, z)
    ddpm = ddpm_step(tables, sched.reverse_variance("beta_tilde").float(), xt, t, eps, z)
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


def test_ddim_sampling_with_eta0_is_deterministic_given_x_T():
    sched = make_schedule(DiffusionConfig(T=50))
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    model_fn = lambda x, t: model(x) * 0.1  # noqa: E731 - a fixed eps-predictor
    wrapped = type("M", (torch.nn.Module,), {"forward": lambda self, x, t: model_fn(x, t)})()
    out = []
    for noise_seed in (0, 0):
        gen = torch.Generator().manual_seed(noise_seed)
        out.append(
            sample(
                wrapped, sched, (3, 1, 4, 4), generator=gen, device=torch.device("cpu"), sampler="ddim", ddim_steps=10
            )
        )
    torch.testing.assert_close(out[0], out[1])
    seen = []
    gen = torch.Generator().manual_seed(0)
    sample(
        wrapped,
        sched,
        (3, 1, 4, 4),
        generator=gen,
        device=torch.device("cpu"),
        sampler="ddim",
        ddim_steps=10,
        observer=lambda t, x: seen.append(t),
    )
    assert seen[0] == 50 and seen[-1] == 0 and len(seen) == 11


def test_l0_uses_the_decoder_variance_of_the_ddpm_code():
    """For sigma = beta the bound's t = 1 variance is beta_tilde_2 ("fixedlarge" in Improved
    DDPM); L_0 of a perfect eps-predictor on 256-level data is checked against the discretized
    Gaussian written out with scipy."""
    from scipy.stats import norm

    from ddpm_engine.diagnostics import per_t_probe

    schedule = make_schedule(DiffusionConfig(T=1000))
    bound = schedule.bound_variance("beta")
    assert bound[0] == schedule.posterior_variance[1] and torch.equal(bound[1:], schedule.betas[1:])
    assert torch.equal(schedule.bound_variance("beta_tilde"), schedule.reverse_variance("beta_tilde"))

    gen = torch.Generator().manual_seed(0)
    levels = 256
    x0 = (torch.randint(1, levels - 1, (64, 1, 4, 4), generator=gen).double() * 2 / (levels - 1) - 1).float()
    noise = torch.randn(x0.shape, generator=gen)

    class Oracle(torch.nn.Module):  # returns the true noise: the reverse mean is the true posterior mean
        def forward(self, xt, t):
            return noise[: len(xt)]

    row = per_t_probe(Oracle(), schedule, x0, noise, [1], sigma="beta", levels=levels).iloc[0]
    abar = float(schedule.alphabar[0])
    xt = (abar**0.5 * x0.double() + (1 - abar) ** 0.5 * noise.double()).numpy()
    mean = (xt - (1 - abar) ** 0.5 * noise.double().numpy()) / abar**0.5  # x0 exactly: mu(x_1, x0) at t = 1
    std = float(schedule.posterior_variance[1]) ** 0.5
    half = 1 / (levels - 1)
    x = x0.double().numpy()
    upper = np.where(x > 0.999, 1.0, norm.cdf((x + half - mean) / std))
    lower = np.where(x < -0.999, 0.0, norm.cdf((x - half - mean) / std))
    bits = -np.log2(np.clip(upper - lower, 1e-12, None)).mean()
    assert row["vlb_bits"] == pytest.approx(bits, rel=1e-3)


def test_stratified_bound_is_exact_at_small_T_and_unbiased_beyond():
    """sum_{t=2..T} L_{t-1}: every t when T - 1 <= budget (exact, SE 0); else one t per stratum,
    whose mean over many draws is the exact sum, with a standard error that covers its spread."""
    from ddpm_engine.diagnostics import diffusion_bits_estimate, stratified_timesteps

    T = 120
    curve = 1.0 / np.arange(1, T + 1) ** 1.5 + 0.01 * np.sin(np.arange(T))  # L_{t-1} by t, index t - 1
    exact = curve[1:].sum()
    ts, sizes = stratified_timesteps(T, 200, torch.Generator().manual_seed(0))
    assert ts == list(range(2, T + 1)) and diffusion_bits_estimate(curve[np.array(ts) - 1], sizes) == (
        pytest.approx(exact),
        0.0,
    )
    estimates, errors = [], []
    for seed in range(400):
        ts, sizes = stratified_timesteps(T, 12, torch.Generator().manual_seed(seed))
        assert sum(sizes) == T - 1 and len(ts) == 12
        assert ts[:6] == [2, 3, 4, 5, 6, 7] and sizes[:6] == [1] * 6  # the steep start, exactly
        value, se = diffusion_bits_estimate(curve[np.array(ts) - 1], sizes)
        estimates.append(value)
        errors.append(se)
    spread = np.std(estimates)
    assert abs(np.mean(estimates) - exact) < 4 * spread / np.sqrt(len(estimates))  # unbiased
    assert np.mean(errors) >= 0.8 * spread  # the collapsed-strata SE does not understate the spread
    # the exact start is what keeps it tight: equal strata over all t spread 2.5 times wider here
    equal = []
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        parts = np.array_split(np.arange(2, T + 1), 12)
        picks = [int(p[torch.randint(len(p), (1,), generator=g).item()]) for p in parts]
        equal.append(sum(len(p) * curve[t - 1] for p, t in zip(parts, picks)))
    assert np.std(equal) > 2 * spread
    # interpolating between 12 evenly spaced t is biased on this convex curve
    grid = np.unique(np.linspace(2, T, 12).round().astype(int))
    interpolated = np.interp(np.arange(2, T + 1), grid, curve[grid - 1]).sum()
    assert abs(interpolated - exact) > 8 * spread / np.sqrt(len(estimates))
