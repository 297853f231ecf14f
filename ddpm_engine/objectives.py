"""Training objectives: which t to train on and how each row's error in the model's target
(objective.prediction: eps, x0 or v) is weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig
from .diffusion import at, discretized_gaussian_log_likelihood, q_sample, reverse_mean, training_target
from .schedule import Schedule


def gaussian_noise(shape, generator: torch.Generator, device, clip: float | None) -> torch.Tensor:
    """Standard normal noise, optionally clipped to [-clip, clip] (the noise_clip ablation).

    Generated on the generator's device and moved, so CPU runs are reproducible from the
    generator state alone.
    """
    eps = torch.randn(shape, generator=generator, device=generator.device).to(device)
    return eps.clamp_(-clip, clip) if clip is not None else eps


def perturbed_noise(eps: torch.Tensor, xi: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """The noise the network's input is built with under DDPM-IP (Ning et al. 2023, "Input
    perturbation reduces exposure bias in diffusion models"): y_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) (eps + gamma xi), the loss still against eps. At gamma = 0 it is eps itself
    (no arithmetic: training stays bit for bit as before)."""
    if gamma == 0.0:
        return eps
    if xi is None:
        raise ValueError("input_perturbation > 0 needs its draw xi")
    return eps + gamma * xi


class TimestepSampler:
    """Draws t for each row and the weight that keeps the loss an unbiased estimate.

    ``uniform`` draws t ~ U{lo..hi}: every t (1..T) unless ``t_range`` = (lo, hi) narrows
    the range (train.t_range). ``importance`` (Improved DDPM sec. 3.3) draws t in the range
    with p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses seen at t, mixed
    with a little uniform mass; until every t of the range has a full history it stays
    uniform. Rows are weighted by 1 / (n p_t), n = hi - lo + 1 (T without a range), so the
    loss estimates the mean over the range's t as uniform drawing does.
    """

    uniform_mix = 1e-3

    def __init__(self, T: int, kind: str, history: int, device: torch.device, t_range: tuple[int, int] | None = None):
        self.T, self.kind, self.device = T, kind, torch.device(device)
        self.lo, self.hi = t_range if t_range is not None else (1, T)
        if not 1 <= self.lo <= self.hi <= T:
            raise ValueError(f"t_range must satisfy 1 <= lo <= hi <= T = {T}, got [{self.lo}, {self.hi}]")
        # every t keeps a slot (a checkpoint's state has the same shape whatever the range)
        self.losses = torch.zeros(T, history, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(T, dtype=torch.long, device=self.device)

    @property
    def width(self) -> int:
        """How many t the range holds."""
        return self.hi - self.lo + 1

    def probabilities(self) -> torch.Tensor:
        """p_t for t = 1..T: zero outside the range."""
        uniform = torch.zeros(self.T, dtype=torch.float64, device=self.device)
        uniform[self.lo - 1 : self.hi] = 1.0 / self.width
        in_range = slice(self.lo - 1, self.hi)
        if self.kind == "uniform" or bool((self.counts[in_range] < self.losses.shape[1]).any()):
            return uniform
        rms = torch.zeros(self.T, dtype=torch.float64, device=self.device)
        rms[in_range] = self.losses[in_range].pow(2).mean(dim=1).sqrt()
        p = rms / rms.sum()
        return p * (1 - self.uniform_mix) + uniform * self.uniform_mix

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "uniform":
            t = torch.randint(self.lo, self.hi + 1, (batch,), generator=generator, device=generator.device)
            return t.to(self.device), torch.ones(batch, device=self.device)
        p = self.probabilities()
        t = torch.multinomial(p.to(generator.device), batch, replacement=True, generator=generator).to(self.device) + 1
        return t, (1.0 / (self.width * p[t - 1])).float()

    def update(self, t: torch.Tensor, row_losses: torch.Tensor) -> None:
        if self.kind == "uniform":
            return
        # One history entry per occurrence: a t drawn k times in a batch fills k slots (the
        # last `history` of them when k is larger), so the warm-up ends exactly when every
        # slot holds a loss and the probabilities follow sqrt(E[L^2]) (Improved DDPM sec. 3.3).
        index = t - 1
        history = self.losses.shape[1]
        order = torch.argsort(index, stable=True)
        grouped = index[order]
        first_of_group = torch.searchsorted(grouped, grouped)
        rank = torch.empty_like(index)
        rank[order] = torch.arange(len(index), device=index.device) - first_of_group
        in_batch = torch.bincount(index, minlength=self.T)[index]
        keep = rank >= in_batch - history
        slot = (self.counts[index] + rank) % history
        self.losses[index[keep], slot[keep]] = row_losses.detach().to(torch.float64)[keep]
        self.counts.index_add_(0, index, torch.ones_like(index))

    def state_dict(self) -> dict:
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR_t, gamma), in the space of
    the model's target. ||eps - eps_hat||^2 = SNR ||x_0 - x0_hat||^2 and ||v - v_hat||^2 =
    (SNR + 1) ||x_0 - x0_hat||^2 (Salimans & Ho 2022 sec. 4), hence eps: min(SNR, gamma) / SNR
    (Hang et al. eq. 9), x0: min(SNR, gamma), v: min(SNR, gamma) / (SNR + 1).

    At SNR = 0 (zero terminal SNR's t = T) the eps form is 0/0 and takes its limit, 1. The x0
    and v weights are 0 there, as their formulas say: such a run does not train at t = T."""
    if prediction == "eps":
        return torch.where(snr > 0, snr.clamp(max=gamma) / snr, torch.ones_like(snr))
    if prediction == "x0":
        return snr.clamp(max=gamma)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}")


class Objective:
    """The per-row training loss of one config: distance to the model's target, weighting,
    L_0 and Min-SNR, all in the target's space (objective.prediction)."""

    def __init__(self, config: ObjectiveConfig, schedule: Schedule, sigma: str, levels: int, device):
        self.config, self.levels = config, levels
        self.tables = schedule.on(device)
        self.reverse_log_variance = schedule.reverse_variance(sigma).log().to(device, torch.float32)
        weights = torch.ones(schedule.T, dtype=torch.float64)
        if config.weighting == "vlb":
            weights = weights * schedule.vlb_weights(sigma, config.prediction)  # DDPM eq. 12, in the target's space
        if config.min_snr_gamma is not None:
            weights = weights * min_snr_weights(schedule.snr(), config.min_snr_gamma, config.prediction)
        self.t_weights = weights.to(device, torch.float32)

    def row_losses(
        self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, xi: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of each row (mean over dimensions), before importance weights. ``xi`` (same
        shape as eps) is the input perturbation's draw, needed when input_perturbation > 0: it
        moves the network's input only, the target is built from the unperturbed eps."""
        xt = q_sample(self.tables, x0, t, perturbed_noise(eps, xi, self.config.input_perturbation))
        output = model(xt, t).float()
        target = training_target(self.tables, x0, t, eps, self.config.prediction)
        if self.config.loss == "huber":
            distance = F.huber_loss(output, target, delta=self.config.huber_delta, reduction="none")
        else:
            distance = (output - target) ** 2
        rows = distance.flatten(1).mean(dim=1) * self.t_weights[t - 1]
        if self.config.l0_term:
            rows = torch.where(t == 1, self.decoder_nll(x0, xt, t, output), rows)
        return rows

    def decoder_nll(self, x0, xt, t, output) -> torch.Tensor:
        """L_0 per row, nats per dimension: -log p(x_0|x_1), discretized decoder (eq. 13)."""
        mean, _ = reverse_mean(self.tables, xt, t, output, prediction=self.config.prediction)
        log_scale = 0.5 * at(self.reverse_log_variance, t, xt)
        nll = -discretized_gaussian_log_likelihood(x0, mean, log_scale, self.levels)
        return nll.flatten(1).mean(dim=1)
