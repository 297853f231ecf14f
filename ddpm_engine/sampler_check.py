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
x_prev = a x_t + c eps_pred + s z, and a, c, s are read off each visited step by evaluating
it on 1-element probes. ``clip_x0`` makes the step nonlinear, so the check covers the
unclipped sampler only.

All A_t share the eigenvectors V of Sigma, so with V computed once (float64) the chain stays
diagonal in that basis: after the O(D^3) eigendecomposition each step costs O(D) to propagate
and O(D^2) to map the mean and the per-pixel variances back to pixels. For the 8x8 digits
(D = 64) a T = 1000 check takes about 0.1 s; D = 4096 takes seconds (the eigendecomposition
dominates). Larger D falls back to a diagonal covariance in ``check_config``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import DiffusionConfig, SampleConfig
from .sampling import ddim_step, ddim_timesteps, ddpm_step
from .schedule import Schedule, make_schedule

# Above this many dimensions check_config fits a diagonal covariance: a full D x D float64
# matrix and its eigendecomposition get expensive (12288^2 doubles is 1.2 GB at 64x64x3).
FULL_COVARIANCE_MAX_DIM = 4096

# The columns of one summary row per checked configuration (check_config results).
TABLE_COLUMNS = (
    "schedule",
    "T",
    "sigma",
    "sampler",
    "steps",
    "eta",
    "prior_mean_gap",
    "max_mean_gap",
    "max_std_gap",
    "final_mean_gap",
    "final_std_gap",
)

# Float64 round-off of a probed step is ~1e-15 relative; a non-affine step is far off this.
_AFFINE_TOL = 1e-9


def _eps_gains(eigvals: torch.Tensor, abar: float) -> torch.Tensor:
    """Eigenvalues of A_t: sqrt(1 - abar) / (abar lambda + 1 - abar), one per eigenvector.

    From DDPM eq. 4 with the Gaussian posterior mean
    x0_hat = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^{-1} (x_t - sqrt(abar) mu):
    eps = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar) = A (x_t - sqrt(abar) mu), and in the
    eigenbasis 1 - abar lambda / (abar lambda + 1 - abar) = (1 - abar) / (abar lambda + 1 - abar).
    Written this way nothing divides by sqrt(1 - abar), which is tiny at t = 1.
    """
    return (1 - abar) ** 0.5 / (abar * eigvals + (1 - abar))


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
    schedule: Schedule, sampler: str, sigma: str, steps: int | None, eta: float, step_fns: dict[str, Callable]
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
            lambda x, e, z: step_fns["ddpm"](tables, sigma2, x, tv, e, z, False), T, lambda j: f"ddpm step t={ts[j]}"
        )
        return ts + [0], coef
    if sampler == "ddim":
        ts = ddim_timesteps(T, steps or T)
        nxt = ts[1:] + [0]  # t_prev = 0 is the final x_0 (DDIM eq. 12)
        tv = torch.tensor(ts).repeat_interleave(P)
        tn = torch.tensor(nxt).repeat_interleave(P)
        coef = _probe(
            lambda x, e, z: step_fns["ddim"](tables, x, tv, tn, e, eta, z, False),
            len(ts),
            lambda j: f"ddim step {ts[j]}->{nxt[j]}",
        )
        return ts + [0], coef
    raise ValueError(f"unknown sampler {sampler!r}")


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


def check_config(diffusion_config: DiffusionConfig, sample_config: SampleConfig, train_x0: torch.Tensor) -> dict:
    """``check_sampler`` for an experiment's diffusion and sample configs, with the Gaussian
    fitted to ``train_x0`` (N x C x H x W in model space [-1, 1]).

    The result also carries schedule, T, sigma (None for ddim), sampler, steps (the number of
    visited steps for ddim, None for ddpm), eta (None for ddpm) and ``approximation`` (full or
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
    )
    result.update(
        schedule=diffusion_config.schedule,
        T=diffusion_config.T,
        sigma=None if is_ddim else diffusion_config.sigma,
        sampler=sampler,
        steps=len(ddim_timesteps(diffusion_config.T, sample_config.steps or diffusion_config.T)) if is_ddim else None,
        eta=sample_config.eta if is_ddim else None,
        approximation=approximation,
    )
    return result
