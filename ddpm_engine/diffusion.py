"""The Gaussian diffusion math of DDPM (Ho et al. 2020), as small pure functions.

Conventions: ``t`` is a LongTensor of 1-based timesteps (1..T, as in the paper), one per
batch row; ``tables`` is ``Schedule.on(device)``, the per-t constants indexed by t-1.
Equation numbers refer to the DDPM paper unless stated.

A model's output is read as its ``prediction`` (objective.prediction): eps, x0 or v. Whatever
uses "the predicted noise" or "the predicted x_0" (the probe, the bound, the samplers) gets it
from ``predicted_eps`` / ``predicted_x0``, one conversion per pair below, so the diagnostics mean
the same for every target.
"""

from __future__ import annotations

import math

import torch

Tables = dict[str, torch.Tensor]


def at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t-1] reshaped to broadcast against ``like`` (B, C, H, W)."""
    return table[t - 1].view(-1, *([1] * (like.ndim - 1)))


def q_sample(tables: Tables, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t|x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I), reparameterised (eq. 4)."""
    return at(tables["sqrt_alphabar"], t, x0) * x0 + at(tables["sqrt_one_minus_alphabar"], t, x0) * eps


def q_posterior(tables: Tables, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
    """Mean, variance and clipped log-variance of q(x_{t-1}|x_t, x_0) (eqs. 6-7)."""
    mean = at(tables["posterior_mean_coef_x0"], t, xt) * x0 + at(tables["posterior_mean_coef_xt"], t, xt) * xt
    return mean, at(tables["posterior_variance"], t, xt), at(tables["posterior_log_variance_clipped"], t, xt)


def x0_from_eps(tables: Tables, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t), eq. 4 solved for x_0."""
    return (xt - at(tables["sqrt_one_minus_alphabar"], t, xt) * eps) / at(tables["sqrt_alphabar"], t, xt)


def eps_from_x0(tables: Tables, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(alphabar_t) x_0) / sqrt(1 - alphabar_t), eq. 4 solved for eps."""
    return (xt - at(tables["sqrt_alphabar"], t, xt) * x0) / at(tables["sqrt_one_minus_alphabar"], t, xt)


def v_target(tables: Tables, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022 sec. 4)."""
    return at(tables["sqrt_alphabar"], t, x0) * eps - at(tables["sqrt_one_minus_alphabar"], t, x0) * x0


def eps_from_v(tables: Tables, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(alphabar_t) v + sqrt(1 - alphabar_t) x_t: the definition of v with eq. 4
    (alphabar + (1 - alphabar) = 1). Finite at alphabar_T = 0, where it is x_T itself."""
    return at(tables["sqrt_alphabar"], t, xt) * v + at(tables["sqrt_one_minus_alphabar"], t, xt) * xt


def x0_from_v(tables: Tables, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v (Salimans & Ho 2022 sec. 4); -v at
    alphabar_T = 0, where eps cannot give x_0."""
    return at(tables["sqrt_alphabar"], t, xt) * xt - at(tables["sqrt_one_minus_alphabar"], t, xt) * v


def training_target(tables: Tables, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, prediction: str):
    """What a model with this ``prediction`` should output for x_t = q_sample(x0, t, eps)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_target(tables, x0, t, eps)
    raise ValueError(f"unknown prediction {prediction!r}")


def predicted_eps(tables: Tables, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: str):
    """eps-hat from a model output read as ``prediction`` (the output itself for eps)."""
    if prediction == "eps":
        return output
    if prediction == "x0":
        return eps_from_x0(tables, xt, t, output)
    if prediction == "v":
        return eps_from_v(tables, xt, t, output)
    raise ValueError(f"unknown prediction {prediction!r}")


def predicted_x0(tables: Tables, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: str):
    """x0-hat from a model output read as ``prediction`` (the output itself for x0). From eps it
    divides by sqrt(alphabar_t): not finite at zero terminal SNR's t = T (config refuses that)."""
    if prediction == "eps":
        return x0_from_eps(tables, xt, t, output)
    if prediction == "x0":
        return output
    if prediction == "v":
        return x0_from_v(tables, xt, t, output)
    raise ValueError(f"unknown prediction {prediction!r}")


def mean_from_eps(tables: Tables, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - alphabar_t) eps_theta) / sqrt(alpha_t) (eq. 11)."""
    beta = at(tables["betas"], t, xt)
    return (xt - beta / at(tables["sqrt_one_minus_alphabar"], t, xt) * eps) / at(tables["alphas"], t, xt).sqrt()


def reverse_mean(
    tables: Tables,
    xt: torch.Tensor,
    t: torch.Tensor,
    output: torch.Tensor,
    clip_x0: bool = False,
    prediction: str = "eps",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of p(x_{t-1}|x_t) and the x_0 it implies, from a model output read as ``prediction``.

    For eps without clipping this is eq. 11. Otherwise x_0 is predicted (and, with clipping,
    clipped to the data range [-1, 1], as the DDPM reference code does) and put into the
    posterior mean (eq. 7); the two agree whenever the prediction is inside the range. Eq. 7
    stays finite at zero terminal SNR's t = T, where eq. 11 divides by sqrt(alpha_T) = 0.
    """
    x0 = predicted_x0(tables, xt, t, output, prediction)
    if prediction == "eps" and not clip_x0:
        return mean_from_eps(tables, xt, t, output), x0
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior(tables, x0, xt, t)
    return mean, x0


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """log p(x_0|x_1) of the discretized Gaussian decoder (eq. 13), elementwise, in nats.

    Data in [-1, 1] with ``levels`` values has bins of width 2/(levels-1) centred on them;
    the outermost bins extend to -inf and +inf so the probabilities of all bins sum to 1.
    """
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    cdf_hi = standard_normal_cdf((x0 - mean + half_bin) * inv_std)
    cdf_lo = standard_normal_cdf((x0 - mean - half_bin) * inv_std)
    edge = 1.0 - 1e-6  # data exactly at the boundary value, with float slack
    tiny = 1e-12
    prob = torch.where(
        x0 <= -edge,
        cdf_hi,
        torch.where(x0 >= edge, 1.0 - cdf_lo, cdf_hi - cdf_lo),
    )
    return torch.log(prob.clamp(min=tiny))


def prior_kl_bits(tables: Tables, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T|x_0) || N(0, I)) per image, in bits/dim (eq. 5)."""
    T = tables["alphabar"].shape[0]
    t = torch.full((x0.shape[0],), T, dtype=torch.long, device=x0.device)
    mean = at(tables["sqrt_alphabar"], t, x0) * x0
    logvar = torch.log(1.0 - at(tables["alphabar"], t, x0)).expand_as(x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))
    return mean_bits(kl)


def vlb_term_bits(
    tables: Tables,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    output: torch.Tensor,
    reverse_log_variance: torch.Tensor,
    levels: int,
    clip_x0: bool = False,
    prediction: str = "eps",
) -> torch.Tensor:
    """One VLB term per image in bits/dim: L_{t-1} for t >= 2 and L_0 for t = 1 (eqs. 5, 13).

    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)), both Gaussian;
    L_0 = -log p_theta(x_0|x_1) with the discretized decoder. ``reverse_log_variance`` is
    log sigma_t^2 per t (index t-1) on x0's device; ``output`` is the model's, read as
    ``prediction``.
    """
    model_mean, _ = reverse_mean(tables, xt, t, output, clip_x0, prediction)
    model_logvar = at(reverse_log_variance, t, xt).expand_as(xt)
    true_mean, _, true_logvar = q_posterior(tables, x0, xt, t)
    kl = normal_kl(true_mean, true_logvar.expand_as(xt), model_mean, model_logvar)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar, levels)
    first = (t == 1).view(-1, *([1] * (x0.ndim - 1)))
    return mean_bits(torch.where(first, nll, kl))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Per-image mean over dimensions, converted from nats to bits."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)
