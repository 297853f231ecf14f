"""Reverse-process samplers: DDPM ancestral (Algorithm 2) and DDIM (Song et al. 2021).

Both run every sample in lockstep over t and call the model in chunks sized for the device,
so an observer sees the whole population at each reverse step (drift statistics need the
percentiles of all samples, not of one chunk).
"""

from __future__ import annotations

from typing import Callable

import torch

from .diffusion import Tables, at, eps_from_x0, reverse_mean
from .objectives import gaussian_noise
from .schedule import Schedule

# observer(t, x_t): called with x_T first, then x_{t-1} after each step, and x_0 with t=0.
Observer = Callable[[int, torch.Tensor], None]


def ddpm_step(
    tables: Tables,
    sigma2: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    eps_pred: torch.Tensor,
    z: torch.Tensor,
    clip_x0: bool = False,
) -> torch.Tensor:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 1 (Algorithm 2, line 4)."""
    mean, _ = reverse_mean(tables, xt, t, eps_pred, clip_x0)
    noise_scale = at(sigma2, t, xt).sqrt() * (t > 1).view(-1, *([1] * (xt.ndim - 1)))
    return mean + noise_scale * z


def ddim_step(
    tables: Tables,
    xt: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eps_pred: torch.Tensor,
    eta: float,
    z: torch.Tensor,
    clip_x0: bool = False,
) -> torch.Tensor:
    """One DDIM update from t to t_prev < t (Song et al. 2021 eq. 12; t_prev = 0 is x_0).

    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev) (eq. 16).
    """
    abar_t = at(tables["alphabar"], t, xt)
    # alphabar with alphabar_0 = 1 prepended, so that t_prev = 0 (the final x_0) indexes it
    alphabar_from_0 = torch.cat([torch.ones_like(tables["alphabar"][:1]), tables["alphabar"]])
    abar_prev = at(alphabar_from_0, t_prev + 1, xt)
    x0 = (xt - (1 - abar_t).sqrt() * eps_pred) / abar_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps_pred = eps_from_x0(tables, xt, t, x0)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_pred
    return abar_prev.sqrt() * x0 + direction + sigma * z


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Evenly spaced visited timesteps, descending, always starting at T (DDIM sec. 4.2)."""
    steps = min(steps, T)
    grid = torch.linspace(T, 1, steps).round().long().unique(sorted=True).flip(0)
    return [int(v) for v in grid]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    device: torch.device,
    sampler: str = "ddpm",
    sigma: str = "beta",
    ddim_steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    noise_clip: float | None = None,
    chunk_size: int = 256,
    observer: Observer | None = None,
    autocast=None,
) -> torch.Tensor:
    """Draw samples from x_T ~ N(0, I); returns x_0 (unclipped model space).

    ``generator`` fixes x_T and every z, so two models sampled with equal generator states
    see the same noise (common random numbers across arms).
    """
    tables = schedule.on(device)
    sigma2 = schedule.reverse_variance(sigma).to(device, torch.float32)
    x = gaussian_noise(shape, generator, device, noise_clip)
    n = shape[0]

    def predict(x_now: torch.Tensor, t_now: int) -> torch.Tensor:
        out = torch.empty_like(x_now)
        for lo in range(0, n, chunk_size):
            chunk = x_now[lo : lo + chunk_size]
            t_vec = torch.full((chunk.shape[0],), t_now, dtype=torch.long, device=device)
            if autocast is not None:
                with autocast():
                    out[lo : lo + chunk_size] = model(chunk, t_vec).float()
            else:
                out[lo : lo + chunk_size] = model(chunk, t_vec)
        return out

    if sampler == "ddpm":
        visited = list(range(schedule.T, 0, -1))
    elif sampler == "ddim":
        visited = ddim_timesteps(schedule.T, ddim_steps or schedule.T)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")

    if observer is not None:
        observer(schedule.T, x)
    for i, t_now in enumerate(visited):
        t_vec = torch.full((n,), t_now, dtype=torch.long, device=device)
        eps_pred = predict(x, t_now)
        z = gaussian_noise(shape, generator, device, noise_clip)
        if sampler == "ddpm":
            x = ddpm_step(tables, sigma2, x, t_vec, eps_pred, z, clip_x0)
            t_next = t_now - 1
        else:
            t_next = visited[i + 1] if i + 1 < len(visited) else 0
            t_prev = torch.full((n,), t_next, dtype=torch.long, device=device)
            x = ddim_step(tables, x, t_vec, t_prev, eps_pred, eta, z, clip_x0)
        if observer is not None:
            observer(t_next, x)
    return x
