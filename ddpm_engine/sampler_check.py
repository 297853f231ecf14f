"""How much sample drift the setup forces: the reverse chain run with an exact Gaussian denoiser.

Fit N(mu, Sigma) to the training data and give the sampler that Gaussian's exact posterior-
mean denoiser, eps_hat(x_t, t) = A_t x_t + b_t. Started from x_T ~ N(0, I), the chain is then
linear-Gaussian, so the mean and covariance of every x_t follow in closed form, with no
sampling noise. Compared with the forward marginals q(x_t) = N(sqrt(abar_t) mu, abar_t Sigma +
(1 - abar_t) I) (DDPM eq. 4), the gaps are what the sampler, T and the schedule cost a perfect
model of this Gaussian: a correct sampler on a schedule that reaches noise has small gaps that
shrink as T grows, and a schedule whose q(x_T) is not N(0, I) shows its prior gap.

The propagation uses the real step functions of ``sampling`` (or ``step_fns`` overrides), so
a bug in them shows up here. Unclipped, a step is affine with scalar coefficients,
x_prev = a x_t + c out + s z (out: the denoiser's output, eps or the target ``prediction``
names), and a, c, s are read off each visited step by evaluating it on 1-element probes. The
exact denoiser gives the same chain in every target; at zero terminal SNR only x0 and v can
express it at t = T. ``clip_x0`` makes the step nonlinear, so the check covers the
unclipped sampler only.

All A_t share the eigenvectors V of Sigma, so with V computed once (float64) the chain stays
diagonal in that basis: after the O(D^3) eigendecomposition each step costs O(D) to propagate
and O(D^2) to map the mean and the per-pixel variances back to pixels. The steps are probed
in one batched call per chain. Measured on 2 CPU cores: the 8x8 digits (D = 64) take about
0.1 s for T = 1000 (0.02 s for 50 DDIM steps); at D = 4096 the float64 eigendecomposition
alone takes about 50 s (it grows as D^3: about 1 s at D = 1024). Above D = 4096
``check_config`` falls back to a diagonal covariance, which costs O(D) per step.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from .config import DiffusionConfig, SampleConfig
from .sampling import ddim_step, ddim_timesteps, ddpm_step
from .schedule import Schedule, make_schedule

# Above this many dimensions check_config fits a diagonal covariance: the eigendecomposition
# of a full D x D float64 matrix grows as D^3 (54 s at D = 4096 on 2 loaded cores, and
# 12288^2 doubles is 1.2 GB at 64x64x3); `harness plan` runs the check, so it must stay fast.
FULL_COVARIANCE_MAX_DIM = 1024

# The columns of one summary row per checked configuration (check_config results).
TABLE_COLUMNS = (
    "schedule",
    "beta_scaling",
    "zero_terminal_snr",
    "T",
    "sigma",
    "sampler",
    "steps",
    "eta",
    "eps_scale",
    "prior_mean_gap",
    "max_mean_gap",
    "max_std_gap",
    "final_mean_gap",
    "final_std_gap",
)

# Float64 round-off of a probed step is ~1e-15 relative; a non-affine step is far off this.
_AFFINE_TOL = 1e-9


def _eps_gains(eigvals: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """Eigenvalues of A_t: sqrt(1 - abar) / (abar lambda + 1 - abar), one per eigenvector.

    From DDPM eq. 4 with the Gaussian posterior mean
    x0_hat = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^{-1} (x_t - sqrt(abar) mu):
    eps = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar) = A (x_t - sqrt(abar) mu), and in the
    eigenbasis 1 - abar lambda / (abar lambda + 1 - abar) = (1 - abar) / (abar lambda + 1 - abar).
    Written this way nothing divides by sqrt(1 - abar), which is tiny at t = 1.
    """
    return (1 - abar) ** 0.5 / (abar * eigvals + (1 - abar))


def _prediction_gains(eigvals: torch.Tensor, abar, prediction: str) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(G, k) with the exact ``prediction`` of N(mu, Sigma) = G (x_t - sqrt(abar) mu) + k mu in
    the eigenbasis (G: one gain per eigenvector). eps: G from ``_eps_gains``, k = 0. x0: the
    Wiener gain sqrt(abar) lambda / (abar lambda + 1 - abar), k = 1. v = sqrt(abar) eps -
    sqrt(1 - abar) x_0 (Salimans & Ho 2022 sec. 4): G = sqrt(abar (1 - abar)) (1 - lambda) /
    (abar lambda + 1 - abar), k = -sqrt(1 - abar)."""
    denominator = abar * eigvals + (1 - abar)
    if prediction == "eps":
        return _eps_gains(eigvals, abar), 0.0
    if prediction == "x0":
        return abar**0.5 * eigvals / denominator, 1.0
    if prediction == "v":
        return (abar * (1 - abar)) ** 0.5 * (1 - eigvals) / denominator, -((1 - abar) ** 0.5)
    raise ValueError(f"unknown prediction {prediction!r}")


def gaussian_eps_map(
    mu: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor | None, abar: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact eps-prediction of data N(mu, Sigma) at noise level ``abar``, as eps = A x_t + b.

    Sigma = eigvecs diag(eigvals) eigvecs^T (``torch.linalg.eigh``, float64); with ``eigvecs``
    None Sigma is diagonal, diag(eigvals), and A is returned as its diagonal (a 1-D tensor).
    b = -A sqrt(abar) mu (see ``_eps_gains`` for the derivation from DDPM eq. 4).
    """
    mu = torch.as_tensor(mu, dtype=torch.float64)
    gains = _eps_gains(torch.as_tensor(eigvals, dtype=torch.float64).clamp(min=0), abar)
    if eigvecs is None:
        A = gains
        return A, -A * abar**0.5 * mu
    V = torch.as_tensor(eigvecs, dtype=torch.float64)
    A = (V * gains) @ V.T
    return A, -(A @ mu) * abar**0.5


# Probe points (x_t, eps, z): the origin, the three unit vectors, and one mixed point that
# checks the step really is affine (a clipped x_0 would fail it).
_PROBES = torch.tensor(
    [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, -3.0, 5.0]], dtype=torch.float64
)


def _probe(step: Callable[..., torch.Tensor], n: int, where: Callable[[int], str]) -> torch.Tensor:
    """(a, c, s) of n affine steps f_j(x, eps, z) = a_j x + c_j eps + s_j z, as an n x 3 tensor.

    ``step(x, eps, z)`` evaluates all n steps on 1-element rows at once (row 5 j + k is probe
    k of step j): the step functions take one t per row, so one call probes a whole chain.
    """
    P = len(_PROBES)
    x, eps, z = _PROBES.repeat(n, 1).unbind(1)
    out = step(x, eps, z).to(torch.float64).reshape(n, P)
    coef = out[:, 1:4] - out[:, :1]
    scale = 1.0 + coef.abs().sum(1)
    offset_err = out[:, 0].abs() / scale
    affine_err = (out[:, 4] - out[:, 0] - coef @ _PROBES[4]).abs() / scale
    if bool((offset_err > _AFFINE_TOL).any()):
        j = int(offset_err.argmax())
        raise ValueError(f"{where(j)}: the step maps (x_t, eps, z) = 0 to {float(out[j, 0]):g}, not 0")
    if bool((affine_err > _AFFINE_TOL).any()):
        raise ValueError(f"{where(int(affine_err.argmax()))}: the step is not affine in (x_t, eps, z) (clip_x0 on?)")
    return coef


def _chain_steps(
    schedule: Schedule,
    sampler: str,
    sigma: str,
    steps: int | None,
    eta: float,
    step_fns: dict[str, Callable],
    prediction: str = "eps",
) -> tuple[list[int], torch.Tensor]:
    """The visited t (T first, 0 last) and the (a, c, s) of each step between them (n x 3)."""
    # float64 tables: the check is of the formulas, not of float32 round-off
    tables = schedule.on("cpu", torch.float64)
    T = schedule.T
    P = len(_PROBES)
    if sampler == "ddpm":
        ts = list(range(T, 0, -1))
        sigma2 = schedule.reverse_variance(sigma).to(torch.float64)
        tv = torch.tensor(ts).repeat_interleave(P)
        coef = _probe(
            lambda x, e, z: step_fns["ddpm"](tables, sigma2, x, tv, e, z, False, prediction=prediction),
            T,
            lambda j: f"ddpm step t={ts[j]}",
        )
        return ts + [0], coef
    if sampler == "ddim":
        ts = ddim_timesteps(T, steps or T)
        nxt = ts[1:] + [0]  # t_prev = 0 is the final x_0 (DDIM eq. 12)
        tv = torch.tensor(ts).repeat_interleave(P)
        tn = torch.tensor(nxt).repeat_interleave(P)
        coef = _probe(
            lambda x, e, z: step_fns["ddim"](tables, x, tv, tn, e, eta, z, False, prediction=prediction),
            len(ts),
            lambda j: f"ddim step {ts[j]}->{nxt[j]}",
        )
        return ts + [0], coef
    raise ValueError(f"unknown sampler {sampler!r}")


def check_sampler(
    schedule: Schedule,
    mu,
    cov,
    *,
    sampler: str = "ddpm",
    sigma: str = "beta",
    steps: int | None = None,
    eta: float = 0.0,
    eps_scale: float = 1.0,
    step_fns: dict[str, Callable] | None = None,
    prediction: str = "eps",
) -> dict:
    """Run the reverse chain of ``sampler`` in closed form with the exact denoiser of N(mu, cov).

    ``mu`` is the flattened data mean (D,), ``cov`` its D x D covariance, or a (D,) vector of
    variances for a diagonal covariance. ``sigma`` is the DDPM reverse variance (beta or
    beta_tilde); ``steps`` (None: T) and ``eta`` are DDIM's; ``eps_scale`` divides the exact
    denoiser's eps at every step as the samplers do (Epsilon Scaling, ``sampling.scale_eps``),
    which keeps the step affine: c becomes c / eps_scale. ``step_fns`` overrides the step
    functions, {"ddpm": f, "ddim": f} with the signatures of ``ddpm_step`` / ``ddim_step``
    (one t per row, as theirs, and their ``prediction`` keyword). Unclipped sampler only:
    clip_x0 makes the step nonlinear. ``prediction`` is what the denoiser outputs (eps, x0,
    v); at zero terminal SNR (alphabar_T = 0) eps cannot give x_0 at t = T and is refused.

    From x_T ~ N(0, I), each step x' = a x + c p + s z with the prediction p = A x + b gives
    mean' = M mean + c b, cov' = M cov M^T + s^2 I, M = a I + c A; all of it is diagonal in the
    eigenbasis of cov. At every visited t (T first, 0 last) the chain's per-pixel mean and
    std are compared with q(x_t) (DDPM eq. 4), and at t = 0 with the data N(mu, cov).

    Returns ``prior_mean_gap`` (mean over pixels of |chain mean - forward mean| at t = T),
    ``max_mean_gap`` and ``max_std_gap`` (largest over visited t, T and 0 included, of the
    pixel-averaged |gap| of mean and of std), ``final_mean_gap`` and ``final_std_gap`` (t = 0
    against the data), ``final_mean`` and ``final_std`` (the chain's x_0 per pixel, numpy), and
    ``chain``, a DataFrame with one row per visited t: t, mean_gap, std_gap, chain_mean,
    forward_mean, chain_std, forward_std (the last four averaged over pixels).

    Reading the mean gaps: with the exact denoiser, a correct DDPM or DDIM step maps the mean
    of q(x_t) to the mean of q(x_prev) (tower property: E[x0_hat] = mu, E[eps_hat] = 0), so the
    chain's mean gap is only the prior gap carried along. A final mean gap well above the
    carried prior gap flags a wrong step even where the std gaps are small; the std gaps are
    what the discretisation (T, steps, sigma) costs.
    """
    if prediction == "eps" and float(schedule.alphabar[-1]) == 0.0:
        raise ValueError(
            "prediction eps at zero terminal SNR: x_0 = (x_T - eps) / sqrt(alphabar_T) is 0/0 at t = T; use v or x0"
        )
    if eps_scale != 1.0 and prediction != "eps":
        # c / eps_scale below scales the step's eps coefficient; an x0 or v prediction enters elsewhere
        raise ValueError(f"eps_scale {eps_scale} needs prediction eps, not {prediction!r}")
    fns = {"ddpm": ddpm_step, "ddim": ddim_step, **(step_fns or {})}
    mu = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    D = mu.numel()
    if cov.ndim == 1:
        if cov.numel() != D:
            raise ValueError(f"diagonal cov has {cov.numel()} entries, mu has {D}")
        eigvals, V = cov.clamp(min=0), None
    elif cov.shape == (D, D):
        # a sample covariance is PSD; eigh may return tiny negative eigenvalues for it
        eigvals, V = torch.linalg.eigh((cov + cov.T) / 2)
        eigvals = eigvals.clamp(min=0)
    else:
        raise ValueError(f"cov must be ({D}, {D}) or ({D},), got {tuple(cov.shape)}")
    mu_e = mu if V is None else V.T @ mu  # mu in the eigenbasis

    ts, coef = _chain_steps(schedule, sampler, sigma, steps, eta, fns, prediction)
    # alphabar at each visited t, with alphabar_0 = 1 for the final x_0
    abars = torch.cat([schedule.alphabar, torch.ones(1, dtype=torch.float64)])[torch.tensor(ts) - 1]

    # the chain in the eigenbasis, one row per visited t: mean_e and the variances var_e.
    # Per step: M = a I + c A (its eigenvalues m) and c b = -c A sqrt(abar) mu + c k mu, since
    # p = A (x - sqrt(abar) mu) + k mu; computed for all steps at once, the loop only accumulates.
    a, c, s = (col[:, None] for col in coef.unbind(1))
    c = c / eps_scale  # the sampler steps with eps / eps_scale
    abar = abars[:-1, None]
    gains, k = _prediction_gains(eigvals[None, :], abar, prediction)  # eigenvalues of A_t, one row per step
    m = a + c * gains
    shift = -c * gains * abar.sqrt() * mu_e + c * k * mu_e
    mean_e = torch.zeros(len(ts), D, dtype=torch.float64)
    var_e = torch.ones(len(ts), D, dtype=torch.float64)
    for j in range(len(ts) - 1):
        torch.addcmul(shift[j], m[j], mean_e[j], out=mean_e[j + 1])  # mean' = M mean + c b
        torch.addcmul(s[j] ** 2, m[j] ** 2, var_e[j], out=var_e[j + 1])  # cov' = M cov M^T + s^2 I

    # back to pixels: the covariance V diag(var_e) V^T has the diagonal (V * V) var_e
    mean = mean_e if V is None else mean_e @ V.T
    std = (var_e if V is None else var_e @ (V**2).T).clamp(min=0).sqrt()
    data_var = eigvals if V is None else (V**2) @ eigvals  # diag(Sigma)
    a_col = abars[:, None]
    fwd_mean = a_col.sqrt() * mu  # q(x_t), DDPM eq. 4; at t = 0 the data
    fwd_std = (a_col * data_var + (1 - a_col)).clamp(min=0).sqrt()
    chain = pd.DataFrame(
        dict(
            t=ts,
            mean_gap=(mean - fwd_mean).abs().mean(1).numpy(),
            std_gap=(std - fwd_std).abs().mean(1).numpy(),
            chain_mean=mean.mean(1).numpy(),
            forward_mean=fwd_mean.mean(1).numpy(),
            chain_std=std.mean(1).numpy(),
            forward_std=fwd_std.mean(1).numpy(),
        )
    )
    return dict(
        prior_mean_gap=float(chain["mean_gap"].iloc[0]),
        max_mean_gap=float(chain["mean_gap"].max()),
        max_std_gap=float(chain["std_gap"].max()),
        final_mean_gap=float(chain["mean_gap"].iloc[-1]),
        final_std_gap=float(chain["std_gap"].iloc[-1]),
        final_mean=mean[-1].numpy(),
        final_std=std[-1].numpy(),
        chain=chain,
    )


def fit_gaussian(train_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Mean, covariance (full while D <= FULL_COVARIANCE_MAX_DIM, else the diagonal as a
    vector) and a sentence saying which, of images N x C x H x W, in float64."""
    x = torch.as_tensor(train_x0).to(torch.float64).reshape(train_x0.shape[0], -1)
    mu = x.mean(dim=0)
    centred = x - mu
    D = x.shape[1]
    # the maximum-likelihood (1/N) covariance: "the Gaussian fitted to the data"
    if D <= FULL_COVARIANCE_MAX_DIM:
        return mu, centred.T @ centred / x.shape[0], "full covariance"
    diag = (centred**2).mean(dim=0)
    return mu, diag, f"diagonal covariance (D = {D} > {FULL_COVARIANCE_MAX_DIM}; pixel correlations ignored)"


def check_config(
    diffusion_config: DiffusionConfig, sample_config: SampleConfig, train_x0: torch.Tensor, prediction: str = "eps"
) -> dict:
    """``check_sampler`` for an experiment's diffusion and sample configs, with the Gaussian
    fitted to ``train_x0`` (N x C x H x W in model space [-1, 1]) and its denoiser answering in
    ``prediction`` (objective.prediction).

    The result also carries schedule, beta_scaling, zero_terminal_snr, T, sigma (None for ddim),
    sampler, steps (the number of visited steps for ddim, None for ddpm), eta (None for ddpm),
    eps_scale and ``approximation`` (full or
    diagonal covariance); ``TABLE_COLUMNS`` picks one summary row out of it. The check is of
    the unclipped sampler whatever ``sample_config.clip_x0`` says.
    """
    schedule = make_schedule(diffusion_config)
    mu, cov, approximation = fit_gaussian(train_x0)
    sampler = sample_config.sampler
    is_ddim = sampler == "ddim"
    result = check_sampler(
        schedule,
        mu,
        cov,
        sampler=sampler,
        sigma=diffusion_config.sigma,
        steps=sample_config.steps,
        eta=sample_config.eta,
        eps_scale=sample_config.eps_scale,
        prediction=prediction,
    )
    result.update(
        schedule=diffusion_config.schedule,
        beta_scaling=diffusion_config.beta_scaling,
        zero_terminal_snr=diffusion_config.zero_terminal_snr,
        T=diffusion_config.T,
        sigma=None if is_ddim else diffusion_config.sigma,
        sampler=sampler,
        steps=len(ddim_timesteps(diffusion_config.T, sample_config.steps or diffusion_config.T)) if is_ddim else None,
        eta=sample_config.eta if is_ddim else None,
        eps_scale=sample_config.eps_scale,
        approximation=approximation,
    )
    return result
