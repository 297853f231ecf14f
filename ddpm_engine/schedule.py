"""Noise schedules and every coefficient derived from them, in float64.

Indexing: tensors are 0-based over t = 1..T, so ``betas[t - 1]`` is beta_t of the paper.
Coefficients are computed in float64 because 1 - alphabar_t underflows in float32 at small
t for long schedules, and the VLB terms divide by it.
"""

from __future__ import annotations

import math

import torch

from .config import DiffusionConfig


def linear_betas(T: int, beta_start: float, beta_end: float, scaling: str = "none") -> torch.Tensor:
    """DDPM sec. 4: betas linear from beta_1 to beta_T.

    With ``scaling="by_T"`` both ends are multiplied by 1000/T (Improved DDPM sec. 3.2), so a
    short chain still ends near pure noise; ``"none"`` keeps 1e-4..0.02 whatever T is, which
    for small T leaves alphabar_T far from 0 (a chain that never reaches noise).
    """
    if scaling == "by_T":
        scale = 1000.0 / T
        beta_start, beta_end = beta_start * scale, beta_end * scale
    elif scaling != "none":
        raise ValueError(f"unknown beta_scaling {scaling!r}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}..{beta_end} "
            f"(after beta_scaling={scaling!r} at T={T})"
        )
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM eq. 17: alphabar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    beta_t = 1 - alphabar_t / alphabar_{t-1}, capped at ``max_beta`` because the last beta
    tends to 1 (a singularity at t = T); the cap decides how close to pure noise x_T gets.
    """
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphabar = f / f[0]
    return (1 - alphabar[1:] / alphabar[:-1]).clamp(max=max_beta)


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: the betas whose sqrt(alphabar_t) is the original one shifted so
    that its last value is 0 and scaled so that its first is unchanged, an affine map
    s -> (s - s_T) s_1 / (s_1 - s_T). alphabar_T is then exactly 0 (beta_T = 1: x_T holds no
    trace of x_0), where every usual schedule stops short of it (alphabar_T = 0.13 at T = 200
    with betas 1e-4..0.02, 4e-5 at T = 1000) and a model trained on it meets at t = T a
    signal it never saw when sampling starts from N(0, I)."""
    sqrt_abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_abar[0], sqrt_abar[-1]
    alphabar = ((sqrt_abar - last) * (first / (first - last))) ** 2
    # alpha_t = alphabar_t / alphabar_{t-1} (DDPM eq. 4), alpha_1 = alphabar_1
    alphas = torch.cat([alphabar[:1], alphabar[1:] / alphabar[:-1]])
    return 1.0 - alphas


class Schedule:
    """All per-t constants of the forward and reverse processes (float64, index t-1).

    Computed once at construction: the training and sampling loops index them every step.
    """

    def __init__(self, betas: torch.Tensor):
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError("betas must be a 1-D tensor with at least 2 entries")
        # beta_T = 1 is zero terminal SNR (zero_terminal_snr_betas); a 1 before T would zero
        # alphabar_t for every later t and leave nothing to denoise from there on
        if not bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) or not 0 < float(betas[-1]) <= 1:
            raise ValueError("every beta_t must lie in (0, 1), and beta_T in (0, 1] (1: zero terminal SNR)")
        self.betas = betas.to(torch.float64)
        self.T = self.betas.shape[0]
        self.alphas = 1.0 - self.betas
        # DDPM eq. 4: alphabar_t = prod_{s<=t} alpha_s
        self.alphabar = torch.cumprod(self.alphas, dim=0)
        # alphabar_{t-1}, with alphabar_0 = 1
        self.alphabar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphabar[:-1]])
        # beta_tilde_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t (DDPM eq. 7)
        self.posterior_variance = (1 - self.alphabar_prev) / (1 - self.alphabar) * self.betas
        # beta_tilde_1 is 0 (the t=1 posterior is a point mass); like Improved DDPM, use
        # beta_tilde_2 there so that the t=1 reverse step and decoder have a finite variance.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        # posterior mean mu_tilde_t = coef_x0 x_0 + coef_xt x_t (DDPM eq. 7)
        self.posterior_mean_coef_x0 = self.alphabar_prev.sqrt() * self.betas / (1 - self.alphabar)
        self.posterior_mean_coef_xt = self.alphas.sqrt() * (1 - self.alphabar_prev) / (1 - self.alphabar)
        self._device_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def reverse_variance(self, sigma: str) -> torch.Tensor:
        """sigma_t^2 of p(x_{t-1}|x_t) (DDPM sec. 3.2): beta_t or beta_tilde_t (clipped at t=1)."""
        if sigma == "beta":
            return self.betas.clone()
        if sigma == "beta_tilde":
            return self.posterior_log_variance_clipped.exp()
        raise ValueError(f"unknown reverse variance {sigma!r}")

    def bound_variance(self, sigma: str) -> torch.Tensor:
        """sigma_t^2 as the variational bound uses it. For sigma = beta the t = 1 entry (the
        variance of the discretized decoder in L_0) is beta_tilde_2, as in the DDPM and Improved
        DDPM code ("fixedlarge": posterior_variance[1] prepended to betas[1:]); beta_1 there
        would make the decoder far narrower than the data's last step of noise and L_0, hence
        bits/dim, incomparable with published numbers. Sampling never uses the t = 1 variance
        (Algorithm 2 adds no noise at t = 1), and training keeps reverse_variance."""
        variance = self.reverse_variance(sigma)
        if sigma == "beta":
            variance[0] = self.posterior_variance[1]
        return variance

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alphabar_t / (1 - alphabar_t)."""
        return self.alphabar / (1 - self.alphabar)

    def vlb_weights(self, sigma: str, prediction: str = "eps") -> torch.Tensor:
        """w_t with L_{t-1} = w_t E||target - prediction||^2 for the model's target.

        eps: DDPM eq. 12, w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alphabar_t)); L_simple
        (eq. 14) drops these weights. x0: the posterior means (eq. 7) differ by
        coef_x0 (x_0 - x0_hat), so w_t = coef_x0^2 / (2 sigma_t^2), eq. 12 times SNR_t. v:
        x_0 - x0_hat = -sqrt(1 - alphabar_t) (v - v_hat) (Salimans & Ho 2022 sec. 4), so eq. 12
        times alphabar_t. At zero terminal SNR (alpha_T = 0) the eps weight of t = T is infinite,
        as eps carries nothing of x_0 there; the x0 and v weights stay finite.
        """
        var = self.reverse_variance(sigma)
        if prediction == "eps":
            return self.betas**2 / (2 * var * self.alphas * (1 - self.alphabar))
        x0_weights = self.posterior_mean_coef_x0**2 / (2 * var)
        if prediction == "x0":
            return x0_weights
        if prediction == "v":
            return x0_weights * (1 - self.alphabar)
        raise ValueError(f"unknown prediction {prediction!r}")

    def on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The per-t tables cast once to ``dtype`` on ``device``, for the hot loops."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            names = [
                "betas",
                "alphas",
                "alphabar",
                "alphabar_prev",
                "posterior_variance",
                "posterior_log_variance_clipped",
                "posterior_mean_coef_x0",
                "posterior_mean_coef_xt",
            ]
            tables = {n: getattr(self, n) for n in names}
            tables["sqrt_alphabar"] = self.alphabar.sqrt()
            tables["sqrt_one_minus_alphabar"] = (1 - self.alphabar).sqrt()
            tables["snr"] = self.snr()
            self._device_cache[key] = {n: v.to(device=device, dtype=dtype) for n, v in tables.items()}
        return self._device_cache[key]


def make_schedule(config: DiffusionConfig) -> Schedule:
    if config.schedule == "linear":
        betas = linear_betas(config.T, config.beta_start, config.beta_end, config.beta_scaling)
    elif config.schedule == "cosine":
        betas = cosine_betas(config.T, config.cosine_s, config.max_beta)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}")
    if config.zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    return Schedule(betas=betas)
