"""The closed-form sampler check: the reverse chain with an exact Gaussian denoiser.

Observed values (digits, 1,617 training images, D = 64) are quoted next to each bound; the
bounds leave a margin of 1.5-3x over them and sit well below what the broken samplers show.
"""

import math

import pytest
import torch

from ddpm_engine.config import DataConfig, DiffusionConfig, SampleConfig
from ddpm_engine.data import load_data
from ddpm_engine.sampler_check import (
    TABLE_COLUMNS,
    check_config,
    check_sampler,
    fit_gaussian,
    gaussian_eps_map,
)
from ddpm_engine.sampling import ddim_step, ddim_timesteps, ddpm_step, sample
from ddpm_engine.schedule import make_schedule


def _random_gaussian(D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A correlated Gaussian in the data range: mean in [-0.5, 0.5], eigenvalues 0.005..0.2,
    one of them 0 (a constant direction, like the always-black border pixels of the digits)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(D, generator=g, dtype=torch.float64) - 0.5
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eigvals = torch.linspace(0.005, 0.2, D, dtype=torch.float64)
    eigvals[0] = 0.0
    return mu, (Q * eigvals) @ Q.T


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_data(DataConfig())
    x0 = d.to_model_space(d.train)
    mu, cov, approximation = fit_gaussian(x0)
    assert approximation == "full covariance"
    return x0, mu, cov


@pytest.fixture(scope="module")
def synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    return _random_gaussian(16, seed=0)


# --- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("abar", [0.9999, 0.5, 1e-3])
def test_gaussian_eps_map_is_the_posterior_mean_denoiser(abar):
    mu, cov = _random_gaussian(5, seed=1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    A, b = gaussian_eps_map(mu, eigvals, eigvecs, abar)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # x0_hat = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^{-1} (x - sqrt(abar) mu), then
    # eps from DDPM eq. 4, computed here the direct way with a linear solve
    K = abar * cov + (1 - abar) * torch.eye(5, dtype=torch.float64)
    x0_hat = mu + abar**0.5 * (cov @ torch.linalg.solve(K, (x - abar**0.5 * mu).T)).T
    eps = (x - abar**0.5 * x0_hat) / (1 - abar) ** 0.5
    torch.testing.assert_close(x @ A.T + b, eps, rtol=1e-9, atol=1e-9)
    # a diagonal Sigma: eigvecs None gives A as its diagonal
    A_diag, b_diag = gaussian_eps_map(mu, cov.diagonal(), None, abar)
    A_full, b_full = gaussian_eps_map(mu, cov.diagonal(), torch.eye(5, dtype=torch.float64), abar)
    torch.testing.assert_close(torch.diag(A_diag), A_full)
    torch.testing.assert_close(b_diag, b_full)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_chain_matches_the_literal_matrix_recursion(sigma):
    """The eigenbasis propagation and the probed coefficients against the recursion written out
    in pixel space with coefficients from DDPM eq. 11, x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t)
    eps) / sqrt(alpha_t) + sigma_t z (no z at t = 1)."""
    mu, cov = _random_gaussian(4, seed=3)
    schedule = make_schedule(DiffusionConfig(T=20, schedule="cosine"))
    eigvals, eigvecs = torch.linalg.eigh(cov)
    sigma2 = schedule.reverse_variance(sigma)
    mean, C = torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    for t in range(20, 0, -1):
        alpha, beta, abar = (float(v[t - 1]) for v in (schedule.alphas, schedule.betas, schedule.alphabar))
        a, c = 1 / alpha**0.5, -beta / (alpha**0.5 * (1 - abar) ** 0.5)
        s2 = float(sigma2[t - 1]) if t > 1 else 0.0
        A, b = gaussian_eps_map(mu, eigvals, eigvecs, abar)
        M = a * torch.eye(4, dtype=torch.float64) + c * A
        mean, C = M @ mean + c * b, M @ C @ M.T + s2 * torch.eye(4, dtype=torch.float64)
    result = check_sampler(schedule, mu, cov, sigma=sigma)
    torch.testing.assert_close(torch.from_numpy(result["final_mean"]), mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(torch.from_numpy(result["final_std"]), C.diagonal().sqrt(), rtol=1e-7, atol=1e-9)
    assert list(result["chain"]["t"]) == list(range(20, -1, -1))


class _AffineEps(torch.nn.Module):
    """A model whose eps prediction is the exact Gaussian denoiser, for the real sampler."""

    def __init__(self, schedule, mu, cov):
        super().__init__()
        eigvals, eigvecs = torch.linalg.eigh(cov)
        self.maps = {
            t: gaussian_eps_map(mu, eigvals, eigvecs, float(schedule.alphabar[t - 1])) for t in range(1, schedule.T + 1)
        }

    def forward(self, x, t):
        A, b = self.maps[int(t[0])]
        flat = x.reshape(x.shape[0], -1).double()
        return (flat @ A.T + b).float().reshape(x.shape)


@pytest.mark.parametrize(
    "options",
    [
        dict(sampler="ddpm", sigma="beta"),
        dict(sampler="ddpm", sigma="beta_tilde"),
        dict(sampler="ddim", steps=10, eta=0.5),
        dict(sampler="ddpm", sigma="beta", eps_scale=1.2),
        dict(sampler="ddim", steps=10, eta=0.5, eps_scale=0.8),
    ],
    ids=["ddpm-beta", "ddpm-beta_tilde", "ddim10-eta0.5", "ddpm-eps_scale1.2", "ddim10-eps_scale0.8"],
)
def test_closed_form_matches_monte_carlo_of_the_real_sampler(options):
    mu, cov = _random_gaussian(4, seed=4)
    schedule = make_schedule(DiffusionConfig(T=20, schedule="cosine"))
    N = 20_000
    x = sample(
        _AffineEps(schedule, mu, cov),
        schedule,
        (N, 1, 2, 2),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        sampler=options["sampler"],
        sigma=options.get("sigma", "beta"),
        ddim_steps=options.get("steps"),
        eta=options.get("eta", 0.0),
        eps_scale=options.get("eps_scale", 1.0),
        chunk_size=N,
    ).reshape(N, 4)
    result = check_sampler(schedule, mu, cov, **options)
    mean, std = torch.from_numpy(result["final_mean"]).float(), torch.from_numpy(result["final_std"]).float()
    # 4 standard errors (sd/sqrt(N) for the mean, about sd/sqrt(2N) for the std of a Gaussian),
    # plus float32 slack; the errors observed are within 2 standard errors
    assert (x.mean(0) - mean).abs().max() < 4 * std.max() / math.sqrt(N) + 1e-4
    assert (x.std(0) - std).abs().max() < 4 * std.max() / math.sqrt(2 * N) + 1e-4


# --- a correct sampler passes -------------------------------------------------------------------

# (diffusion, sample, bound on final_std_gap). Observed on digits: linear DDPM beta 0.00035,
# beta_tilde 0.0032; cosine beta 0.0002, beta_tilde 0.0018; DDIM eta 0 with T steps 0.0015
# (linear) and 0.0009 (cosine); DDIM with 50 steps 0.022 (linear) and 0.015 (cosine): 50 steps
# of the deterministic sampler shrink the spread of x_0 measurably, hence its wider bound.
PASSING = {
    "linear-ddpm-beta": (DiffusionConfig(), SampleConfig(), 0.01),
    "linear-ddpm-beta_tilde": (DiffusionConfig(sigma="beta_tilde"), SampleConfig(), 0.01),
    "cosine-ddpm-beta": (DiffusionConfig(schedule="cosine"), SampleConfig(), 0.01),
    "cosine-ddpm-beta_tilde": (DiffusionConfig(schedule="cosine", sigma="beta_tilde"), SampleConfig(), 0.01),
    "linear-ddim50": (DiffusionConfig(), SampleConfig(sampler="ddim", steps=50), 0.035),
    "cosine-ddim50": (DiffusionConfig(schedule="cosine"), SampleConfig(sampler="ddim", steps=50), 0.035),
    "linear-ddimT": (DiffusionConfig(), SampleConfig(sampler="ddim"), 0.01),
    "cosine-ddimT": (DiffusionConfig(schedule="cosine"), SampleConfig(sampler="ddim"), 0.01),
}


@pytest.mark.parametrize("case", list(PASSING))
def test_correct_samplers_pass_on_digits(digits, case):
    x0, _, _ = digits
    diffusion, sample_config, std_bound = PASSING[case]
    r = check_config(diffusion, sample_config, x0)
    # mean gaps are the prior's: linear T = 1000 leaves sqrt(abar_T) = 0.0064, a gap of 0.0034
    # at t = T, carried to 0.000006 (DDPM) or 0.0012 (DDIM, deterministic) at t = 0; the cosine
    # schedule's is 0.00003
    assert r["max_mean_gap"] < 0.005
    assert r["final_mean_gap"] < 0.005
    assert r["final_std_gap"] < std_bound
    assert r["max_std_gap"] < std_bound
    assert r["T"] == 1000 and r["schedule"] == diffusion.schedule and r["sampler"] == sample_config.sampler


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("options", [dict(sampler="ddpm"), dict(sampler="ddim", steps=50)], ids=["ddpm", "ddim50"])
def test_correct_samplers_pass_on_a_synthetic_gaussian(synthetic, schedule_name, options):
    mu, cov = synthetic
    r = check_sampler(make_schedule(DiffusionConfig(schedule=schedule_name)), mu, cov, **options)
    # observed: DDPM max gaps 0.0009 (std), 0.003 (mean, the linear prior); DDIM 50 std 0.02
    assert r["max_mean_gap"] < 0.005
    assert r["max_std_gap"] < 0.035
    assert r["final_mean_gap"] < 0.005


def test_std_gaps_shrink_as_T_grows(digits):
    """Linear betas scaled by 1000/T at T = 50, 200, 1000. The std gap is the discretisation's
    and shrinks like 1/T: max_std_gap 0.0207, 0.0048, 0.00094; final_std_gap 0.0053, 0.0013,
    0.00035. The mean gap does not: it is the prior gap alone (max_mean_gap equals
    prior_mean_gap, 0.0015, 0.0030, 0.0034), and scaled betas reach noise a little better
    at small T."""
    _, mu, cov = digits
    results = [
        check_sampler(make_schedule(DiffusionConfig(T=T, beta_scaling="by_T")), mu, cov) for T in (50, 200, 1000)
    ]
    for shorter, longer in zip(results, results[1:]):
        assert longer["max_std_gap"] < shorter["max_std_gap"] / 3
        assert longer["final_std_gap"] < shorter["final_std_gap"] / 3
    for r in results:
        assert r["max_mean_gap"] == pytest.approx(r["prior_mean_gap"])
        assert r["max_mean_gap"] < 0.005
    assert results[0]["max_std_gap"] < 0.03


def test_unscaled_short_schedule_shows_its_prior_gap(digits):
    """T = 200 with betas 1e-4..0.02 ends at abar_T = 0.134: x_T keeps sqrt(abar_T) = 0.37 of the
    data mean, which N(0, I) lacks. Observed prior_mean_gap 0.196, carried to 0.0195 at t = 0
    (final_std_gap 0.004); with betas scaled by_T the prior gap is 0.0030."""
    x0, mu, _ = digits
    schedule = make_schedule(DiffusionConfig(T=200, beta_scaling="none"))
    r = check_config(DiffusionConfig(T=200, beta_scaling="none"), SampleConfig(), x0)
    assert 0.15 < r["prior_mean_gap"] < 0.25
    # the prior gap is exactly mean |0 - sqrt(abar_T) mu|
    assert r["prior_mean_gap"] == pytest.approx(float(schedule.alphabar[-1].sqrt() * mu.abs().mean()), rel=1e-9)
    assert r["max_mean_gap"] == pytest.approx(r["prior_mean_gap"])
    assert 0.01 < r["final_mean_gap"] < 0.03
    scaled = check_config(DiffusionConfig(T=200, beta_scaling="by_T"), SampleConfig(), x0)
    assert scaled["prior_mean_gap"] < 0.01


# --- broken samplers fail ------------------------------------------------------------------------


def _ddpm_variance_doubled(tables, sigma2, xt, t, eps_pred, z, clip_x0=False, prediction="eps"):
    return ddpm_step(tables, 2 * sigma2, xt, t, eps_pred, z, clip_x0, prediction)


def _ddpm_beta_as_std(tables, sigma2, xt, t, eps_pred, z, clip_x0=False, prediction="eps"):
    # noise scale beta_t instead of sqrt(beta_t): ddpm_step takes a variance and square-roots it
    return ddpm_step(tables, sigma2**2, xt, t, eps_pred, z, clip_x0, prediction)


def _ddpm_t_minus_1(tables, sigma2, xt, t, eps_pred, z, clip_x0=False, prediction="eps"):
    return ddpm_step(tables, sigma2, xt, (t - 1).clamp(min=1), eps_pred, z, clip_x0, prediction)


def _ddim_t_minus_1(tables, xt, t, t_prev, eps_pred, eta, z, clip_x0=False, prediction="eps"):
    return ddim_step(tables, xt, (t - 1).clamp(min=1), t_prev, eps_pred, eta, z, clip_x0, prediction)


def _ddim_t_prev_minus_1(tables, xt, t, t_prev, eps_pred, eta, z, clip_x0=False, prediction="eps"):
    return ddim_step(tables, xt, t, (t_prev - 1).clamp(min=0), eps_pred, eta, z, clip_x0, prediction)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("broken", [_ddpm_variance_doubled, _ddpm_beta_as_std], ids=["doubled", "beta_as_std"])
def test_wrong_reverse_variance_fails(digits, schedule_name, broken):
    """Observed final_std_gap (linear, cosine): real 0.00035, 0.0002; doubled 0.19, 0.19;
    beta as std 0.43, 0.43 (max_std_gap 0.41 and 0.85)."""
    _, mu, cov = digits
    schedule = make_schedule(DiffusionConfig(schedule=schedule_name))
    real = check_sampler(schedule, mu, cov)
    bad = check_sampler(schedule, mu, cov, step_fns={"ddpm": broken})
    assert real["final_std_gap"] < 0.01 and real["max_std_gap"] < 0.01
    assert bad["final_std_gap"] > 0.1 and bad["max_std_gap"] > 0.3


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddpm_coefficients_at_t_minus_1_fail(digits, schedule_name):
    """Coefficients one step late are an O(1/T) error: at T = 1000 the std gaps stay small
    (final_std_gap 0.0030 linear, 0.0017 cosine, against 0.00035 and 0.0002 for the real step),
    below the drift bound of the passing test. The mean exposes it: a correct step carries only
    the prior gap to t = 0 (final_mean_gap 6e-6 linear, 4e-10 cosine), the late one leaves
    6.0e-4 and 4.6e-4. On a short chain (T = 50, by_T) the std gap shows too: 0.033 against
    0.0053."""
    _, mu, cov = digits
    schedule = make_schedule(DiffusionConfig(schedule=schedule_name))
    real = check_sampler(schedule, mu, cov)
    bad = check_sampler(schedule, mu, cov, step_fns={"ddpm": _ddpm_t_minus_1})
    assert real["final_mean_gap"] < 5e-5
    assert bad["final_mean_gap"] > 3e-4
    assert bad["final_std_gap"] > 4 * real["final_std_gap"]
    short = make_schedule(DiffusionConfig(T=50, beta_scaling="by_T", schedule=schedule_name))
    real_short = check_sampler(short, mu, cov)
    bad_short = check_sampler(short, mu, cov, step_fns={"ddpm": _ddpm_t_minus_1})
    assert real_short["final_mean_gap"] < 5e-5 and bad_short["final_mean_gap"] > 5e-3
    assert bad_short["final_std_gap"] > 0.02 > 2 * real_short["final_std_gap"]


@pytest.mark.parametrize("broken", [_ddim_t_minus_1, _ddim_t_prev_minus_1], ids=["t-1", "t_prev-1"])
def test_ddim_off_by_one_fails(digits, broken):
    """With every t visited, abar at t - 1 makes each step the identity (t - 1 is t_prev) and
    abar_prev one step late skips ahead. Observed final_mean_gap, linear, T steps: real 0.0012,
    t - 1 0.43, t_prev - 1 0.16 (max_mean_gap 0.0034, 0.54, 0.27). With 50 steps the shift is
    a twentieth of a step and the gaps are small but the mean still shows them: cosine,
    real 9e-6, t - 1 0.017, t_prev - 1 0.0098."""
    _, mu, cov = digits
    linear = make_schedule(DiffusionConfig())
    real = check_sampler(linear, mu, cov, sampler="ddim")
    bad = check_sampler(linear, mu, cov, sampler="ddim", step_fns={"ddim": broken})
    assert real["final_mean_gap"] < 0.005 and real["max_mean_gap"] < 0.005 and real["max_std_gap"] < 0.01
    assert bad["final_mean_gap"] > 0.1 and bad["max_mean_gap"] > 0.2
    cosine = make_schedule(DiffusionConfig(schedule="cosine"))
    real = check_sampler(cosine, mu, cov, sampler="ddim", steps=50)
    bad = check_sampler(cosine, mu, cov, sampler="ddim", steps=50, step_fns={"ddim": broken})
    assert real["final_mean_gap"] < 1e-4
    assert bad["final_mean_gap"] > 0.005


def test_nonlinear_or_offset_steps_are_refused(synthetic):
    mu, cov = synthetic
    schedule = make_schedule(DiffusionConfig(T=50, beta_scaling="by_T"))

    def clipped(tables, sigma2, xt, t, eps_pred, z, clip_x0=False, prediction="eps"):
        return ddpm_step(tables, sigma2, xt, t, eps_pred, z, True, prediction)

    def offset(tables, sigma2, xt, t, eps_pred, z, clip_x0=False, prediction="eps"):
        return ddpm_step(tables, sigma2, xt, t, eps_pred, z, clip_x0, prediction) + 0.1

    with pytest.raises(ValueError, match="not affine"):
        check_sampler(schedule, mu, cov, step_fns={"ddpm": clipped})
    with pytest.raises(ValueError, match="not 0"):
        check_sampler(schedule, mu, cov, step_fns={"ddpm": offset})


# --- check_config ----------------------------------------------------------------------------------


def test_check_config_row(digits):
    x0, mu, cov = digits
    ddpm = check_config(DiffusionConfig(sigma="beta_tilde"), SampleConfig(), x0)
    ddim = check_config(DiffusionConfig(), SampleConfig(sampler="ddim", steps=50, eta=1.0), x0)
    assert set(TABLE_COLUMNS) <= set(ddpm) and set(TABLE_COLUMNS) <= set(ddim)
    assert (ddpm["sigma"], ddpm["steps"], ddpm["eta"]) == ("beta_tilde", None, None)
    assert (ddim["sigma"], ddim["steps"], ddim["eta"]) == (None, 50, 1.0)
    assert ddpm["approximation"] == "full covariance"
    direct = check_sampler(make_schedule(DiffusionConfig()), mu, cov, sampler="ddim", steps=50, eta=1.0)
    assert ddim["final_std_gap"] == pytest.approx(direct["final_std_gap"], rel=1e-12)
    chain = ddpm["chain"]
    assert list(chain.columns) == [
        "t",
        "mean_gap",
        "std_gap",
        "chain_mean",
        "forward_mean",
        "chain_std",
        "forward_std",
    ]
    assert len(chain) == 1001 and chain["t"].iloc[0] == 1000 and chain["t"].iloc[-1] == 0
    assert len(ddim["chain"]) == 51
    # Epsilon Scaling reaches the check: the closed form of the scaled sampler, not the plain one
    scaled = check_config(DiffusionConfig(), SampleConfig(eps_scale=1.02), x0)
    assert scaled["eps_scale"] == 1.02 and ddpm["eps_scale"] == 1.0
    direct = check_sampler(make_schedule(DiffusionConfig()), mu, cov, eps_scale=1.02)
    assert scaled["final_std_gap"] == pytest.approx(direct["final_std_gap"], rel=1e-12)
    plain = check_config(DiffusionConfig(), SampleConfig(), x0)
    assert scaled["final_std_gap"] > plain["final_std_gap"] + 0.005  # less noise removed: wider samples


# --- Epsilon Scaling in the samplers (Ning et al. 2024) ---------------------------------------------


class _FixedEps(torch.nn.Module):
    """Predicts the same eps tensor whatever x_t and t, so a step has a closed form."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps.expand_as(x).clone()


def _first_step(sampler: str, eps_scale: float, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_T, x after the first step, the final x_0) of ``sample`` with a fixed eps, seed 0."""
    schedule = make_schedule(DiffusionConfig(T=10))
    eps = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    seen = []
    out = sample(
        _FixedEps(eps),
        schedule,
        (3, 1, 2, 2),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        sampler=sampler,
        eps_scale=eps_scale,
        observer=lambda t, x: seen.append(x.clone()),
        **options,
    )
    return seen[0], seen[1], out


def test_eps_scale_one_leaves_the_sampler_bit_identical_to_plain_algorithm_2():
    """With the scale at 1 the chain is, bit for bit, the unscaled chain written out with
    ddpm_step / ddim_step (the samplers as they were before the knob): no division happens."""
    schedule = make_schedule(DiffusionConfig(T=10))
    eps = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    _, _, out = _first_step("ddpm", 1.0)
    gen = torch.Generator().manual_seed(0)
    tables, sigma2 = schedule.on("cpu"), schedule.reverse_variance("beta").float()
    x = torch.randn((3, 1, 2, 2), generator=gen)
    for t in range(10, 0, -1):
        z = torch.randn(x.shape, generator=gen)
        x = ddpm_step(tables, sigma2, x, torch.full((3,), t), eps.expand_as(x).clone(), z)
    assert torch.equal(out, x)
    _, _, out = _first_step("ddim", 1.0, ddim_steps=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 1, 2, 2), generator=gen)
    visited = ddim_timesteps(10, 5)
    for t, t_next in zip(visited, visited[1:] + [0]):
        z = torch.randn(x.shape, generator=gen)
        x = ddim_step(tables, x, torch.full((3,), t), torch.full((3,), t_next), eps.expand_as(x).clone(), 0.0, z)
    assert torch.equal(out, x)


@pytest.mark.parametrize("scale", [0.8, 1.3])
def test_eps_scale_divides_the_predicted_noise_in_one_step_by_hand(scale):
    """One step, written out from the schedule in float64: DDPM Algorithm 2 and DDIM eq. 12
    (eta = 0.5, eq. 16) with eps / scale in place of eps, in the x_0 estimate and the direction."""
    schedule = make_schedule(DiffusionConfig(T=10))
    eps = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(9)).double() / scale
    gen = torch.Generator().manual_seed(0)
    x_T, z = torch.randn((3, 1, 2, 2), generator=gen).double(), torch.randn((3, 1, 2, 2), generator=gen).double()
    beta, alpha, abar = (float(v[-1]) for v in (schedule.betas, schedule.alphas, schedule.alphabar))
    ddpm = (x_T - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha) + math.sqrt(beta) * z  # Algorithm 2, line 4
    start, after, _ = _first_step("ddpm", scale)
    torch.testing.assert_close(start.double(), x_T)
    torch.testing.assert_close(after.double(), ddpm, atol=1e-6, rtol=1e-6)

    abar_prev = float(schedule.alphabar[ddim_timesteps(10, 5)[1] - 1])
    x0 = (x_T - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    sigma = 0.5 * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    ddim = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps + sigma * z
    _, after, _ = _first_step("ddim", scale, ddim_steps=5, eta=0.5)
    torch.testing.assert_close(after.double(), ddim, atol=1e-6, rtol=1e-6)
    # and the scale is not ignored: the unscaled step lands elsewhere
    _, plain, _ = _first_step("ddpm", 1.0)
    assert (plain.double() - ddpm).abs().max() > 1e-3


def test_large_images_use_a_diagonal_covariance():
    # 1 x 65 x 65 = 4225 > 4096 dimensions
    x0 = torch.rand(32, 1, 65, 65, generator=torch.Generator().manual_seed(5)) * 2 - 1
    r = check_config(DiffusionConfig(T=100, beta_scaling="by_T"), SampleConfig(), x0)
    assert r["approximation"].startswith("diagonal covariance")
    flat = x0.double().reshape(32, -1)
    direct = check_sampler(
        make_schedule(DiffusionConfig(T=100, beta_scaling="by_T")), flat.mean(0), flat.var(0, correction=0)
    )
    assert r["final_std_gap"] == pytest.approx(direct["final_std_gap"], rel=1e-12)
    # a diagonal vector and the same diagonal as a matrix give the same chain
    mu, cov = _random_gaussian(6, seed=6)
    schedule = make_schedule(DiffusionConfig(T=50, beta_scaling="by_T"))
    as_vector = check_sampler(schedule, mu, cov.diagonal())
    as_matrix = check_sampler(schedule, mu, torch.diag(cov.diagonal()))
    for key in ("max_mean_gap", "max_std_gap", "final_mean_gap", "final_std_gap"):
        assert as_vector[key] == pytest.approx(as_matrix[key], rel=1e-9, abs=1e-12)
