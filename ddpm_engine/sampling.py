"""Reverse-process samplers: DDPM ancestral (Algorithm 2) and DDIM (Song et al. 2021).

Every sampler is a function with one signature, in the style of k-diffusion::

    sampler(denoiser, x_T, schedule, *, generator, noise_clip=None, clip_x0=False,
            prediction="eps", eps_scale=1.0, callback=None, **options) -> x_0

``denoiser(x, t)`` is the model's output for the whole population at integer step t, read as
``prediction`` (eps, x0 or v: objective.prediction; diffusion.predicted_eps / predicted_x0), and
``callback(t, x_t)`` sees the whole population at each reverse step (drift statistics need
the percentiles of all samples, not of one chunk). Adding a sampler is adding one function
to ``SAMPLERS``.

A chain runs in the dtype of its x_T: the schedule's tables, the reverse variances and every
z are cast to it (z is drawn in float32 and cast, so a float64 chain sees the very numbers a
float32 one does; see ``in_precision``).
"""

from __future__ import annotations

import copy
from typing import Callable, ContextManager

import torch

from .diffusion import Tables, at, eps_from_x0, predicted_eps, predicted_x0, reverse_mean
from .objectives import gaussian_noise
from .schedule import Schedule

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
# callback(t, x_t): called with x_T at t = T first, then with x after each step and its new
# t, ending with x_0 at t = 0.
Callback = Callable[[int, torch.Tensor], None]


def ddpm_step(
    tables: Tables,
    sigma2: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    output: torch.Tensor,
    z: torch.Tensor,
    clip_x0: bool = False,
    prediction: str = "eps",
) -> torch.Tensor:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 1 (Algorithm 2, line 4);
    ``output`` is the model's, read as ``prediction``."""
    mean, _ = reverse_mean(tables, xt, t, output, clip_x0, prediction)
    noise_scale = at(sigma2, t, xt).sqrt() * (t > 1).view(-1, *([1] * (xt.ndim - 1)))
    return mean + noise_scale * z


def ddim_step(
    tables: Tables,
    xt: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    output: torch.Tensor,
    eta: float,
    z: torch.Tensor,
    clip_x0: bool = False,
    prediction: str = "eps",
) -> torch.Tensor:
    """One DDIM update from t to t_prev < t (Song et al. 2021 eq. 12; t_prev = 0 is x_0), from
    a model ``output`` read as ``prediction``.

    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev) (eq. 16).
    """
    abar_t = at(tables["alphabar"], t, xt)
    # alphabar with alphabar_0 = 1 prepended, so that t_prev = 0 (the final x_0) indexes it
    alphabar_from_0 = torch.cat([torch.ones_like(tables["alphabar"][:1]), tables["alphabar"]])
    abar_prev = at(alphabar_from_0, t_prev + 1, xt)
    eps_pred = predicted_eps(tables, xt, t, output, prediction)
    x0 = predicted_x0(tables, xt, t, output, prediction)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps_pred = eps_from_x0(tables, xt, t, x0)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_pred
    return abar_prev.sqrt() * x0 + direction + sigma * z


def scale_eps(output: torch.Tensor, eps_scale: float, prediction: str = "eps") -> torch.Tensor:
    """Epsilon Scaling (Ning et al. 2024, "Elucidating the exposure bias in diffusion models"):
    the step uses eps_theta / lambda in place of eps_theta, here with a constant lambda (their
    uniform schedule lambda_t = b; k t + b with k = 0). At lambda = 1 the output is returned
    untouched, so a sampler without scaling is bit for bit what it was. Defined for an eps
    model only (config refuses other targets with eps_scale != 1): an x0 or v output would
    have to be turned into eps and back, which at zero terminal SNR divides by 0."""
    if eps_scale == 1.0:
        return output
    if prediction != "eps":
        raise ValueError(f"eps_scale {eps_scale} needs prediction eps, not {prediction!r}")
    return output / eps_scale


PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def in_precision(
    denoiser: torch.nn.Module, autocast: Callable[[], ContextManager] | None, precision: str
) -> tuple[torch.nn.Module, Callable[[], ContextManager] | None, torch.dtype]:
    """(denoiser, autocast, dtype) of a chain run in ``precision``. fp32 returns its inputs.
    fp64 runs the whole chain in float64, the model's forward included: a float64 copy of the
    denoiser (its weights cast, the original untouched) and no autocast (bf16 autocast would
    undo it). Why the forward too: the question is whether 1000 steps in float32 lose
    anything, and the network's own float32 rounding enters every step as much as the
    step's arithmetic does."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return denoiser, autocast, dtype
    return copy.deepcopy(denoiser).to(dtype), None, dtype


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Evenly spaced visited timesteps, descending, always starting at T (DDIM sec. 4.2)."""
    steps = min(steps, T)
    grid = torch.linspace(T, 1, steps).round().long().unique(sorted=True).flip(0)
    return [int(v) for v in grid]


def chunked_eps(
    model: torch.nn.Module, chunk_size: int = 256, autocast: Callable[[], ContextManager] | None = None
) -> Denoiser:
    """The denoiser of ``model``: its output (eps, or the target objective.prediction names) for
    the whole population, computed ``chunk_size`` samples per forward pass (under ``autocast``
    when given) to bound memory, in the dtype of x (a float64 chain needs a float64 model:
    ``in_precision``)."""

    def denoiser(x: torch.Tensor, t: int) -> torch.Tensor:
        eps = torch.empty_like(x)
        for lo in range(0, x.shape[0], chunk_size):
            chunk = x[lo : lo + chunk_size]
            t_vec = _timesteps(t, chunk)
            if autocast is not None:
                with autocast():
                    eps[lo : lo + chunk_size] = model(chunk, t_vec).float()
            else:
                eps[lo : lo + chunk_size] = model(chunk, t_vec)
        return eps

    return denoiser


def _timesteps(t: int, x: torch.Tensor) -> torch.Tensor:
    """t for every row of ``x``, as the long tensor the model and the step formulas take."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    generator: torch.Generator,
    noise_clip: float | None = None,
    clip_x0: bool = False,
    sigma: str = "beta",
    prediction: str = "eps",
    eps_scale: float = 1.0,
    callback: Callback | None = None,
    **unused,
) -> torch.Tensor:
    """Ancestral sampling over every t = T..1 (DDPM Algorithm 2); ``sigma`` picks the reverse
    variance, beta_t or beta_tilde_t (DDPM sec. 3.2); ``eps_scale`` divides every predicted
    noise (``scale_eps``). Draws one z per step, the last one too although t = 1 adds no
    noise. ``unused`` takes other samplers' options (steps, eta)."""
    tables = schedule.on(x_T.device, x_T.dtype)
    sigma2 = schedule.reverse_variance(sigma).to(x_T.device, x_T.dtype)
    x = x_T
    if callback is not None:
        callback(schedule.T, x)
    for t in range(schedule.T, 0, -1):
        output = scale_eps(denoiser(x, t), eps_scale, prediction)
        z = gaussian_noise(x.shape, generator, x.device, noise_clip).to(x.dtype)
        x = ddpm_step(tables, sigma2, x, _timesteps(t, x), output, z, clip_x0, prediction)
        if callback is not None:
            callback(t - 1, x)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    generator: torch.Generator,
    steps: int | None = None,
    eta: float = 0.0,
    noise_clip: float | None = None,
    clip_x0: bool = False,
    prediction: str = "eps",
    eps_scale: float = 1.0,
    callback: Callback | None = None,
    **unused,
) -> torch.Tensor:
    """DDIM over ``steps`` evenly spaced t (all T when None), eq. 12 with the eta-scaled
    sigma of eq. 16; ``eps_scale`` divides every predicted noise, in the x_0 estimate and the
    direction alike (``scale_eps``). Draws one z per visited step even at eta = 0, so that
    arms differing only in eta share their noise. ``unused`` takes other samplers' options
    (sigma)."""
    visited = ddim_timesteps(schedule.T, steps or schedule.T)
    tables = schedule.on(x_T.device, x_T.dtype)
    x = x_T
    if callback is not None:
        callback(schedule.T, x)
    for t, t_next in zip(visited, visited[1:] + [0]):
        output = scale_eps(denoiser(x, t), eps_scale, prediction)
        z = gaussian_noise(x.shape, generator, x.device, noise_clip).to(x.dtype)
        x = ddim_step(tables, x, _timesteps(t, x), _timesteps(t_next, x), output, eta, z, clip_x0, prediction)
        if callback is not None:
            callback(t_next, x)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim}


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
    prediction: str = "eps",
    eps_scale: float = 1.0,
    precision: str = "fp32",
    chunk_size: int = 256,
    observer: Callback | None = None,
    autocast=None,
) -> torch.Tensor:
    """Draw samples from x_T ~ N(0, I) with ``SAMPLERS[sampler]``; returns x_0 (unclipped
    model space, in ``precision``'s dtype).

    ``generator`` gives x_T first, then one z per visited step, so two models sampled with
    equal generator states see the same noise (common random numbers across arms).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}")
    model, autocast, dtype = in_precision(model, autocast, precision)
    x_T = gaussian_noise(shape, generator, device, noise_clip).to(dtype)
    return SAMPLERS[sampler](
        chunked_eps(model, chunk_size, autocast),
        x_T,
        schedule,
        generator=generator,
        noise_clip=noise_clip,
        clip_x0=clip_x0,
        sigma=sigma,
        prediction=prediction,
        steps=ddim_steps,
        eta=eta,
        eps_scale=eps_scale,
        callback=observer,
    )
