"""Parameter-free reference denoisers: bounds on the irreducible eps-prediction loss per t.

A trained model's per-t loss mixes three things: bugs, the method, and model capacity. Each
reference here is an exact Bayes (or classical) denoiser under a stated data model, fitted on
the TRAINING split only, so its held-out loss at t is what that data model already achieves:
a model worse than the per-pixel Bayes denoiser at small t loses to a lookup table, which is
a bug or a capacity problem, not the irreducible noise.

Every reference is an ``nn.Module`` with the model's call signature,
``forward(x_t: N x C x H x W, t: LongTensor[N], 1-based) -> eps_hat`` (float32, float64 for a
float64 x_t: a chain run in fp64, ``sampling.in_precision``), so the probe
(``diagnostics.per_t_probe``), the samplers and every diagnostic accept it; built with
``prediction`` x0 or v it answers in that target instead, as a model trained on it would. The
fitted statistics are buffers, never parameters. Each predicts x_0 (``posterior_mean``) and
turns it into eps with eq. 4 solved for eps, eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
(DDPM eq. 4). They compute in float64, because 1 - abar_t is ~1e-4 at t = 1 and that division
amplifies float32 rounding of x_0 a hundredfold; float64 is not available on MPS, so run
them on the CPU or CUDA there.

Memory stays bounded: every forward works on chunks of at most ``chunk_elements`` float64
intermediates (query images x training images, or x quantization levels).
"""

from __future__ import annotations

import torch
from torch import nn

from .schedule import Schedule

# Float64 intermediates per chunk: 2**22 of them is 32 MiB, small next to any model.
CHUNK_ELEMENTS = 1 << 22
# log(0) guard of the per-pixel histograms: a level never seen at a pixel gets weight ~1e-12,
# small enough that the likelihood decides whenever it is informative, yet finite.
_LOG_FLOOR = 1e-12


def output_dtype(x_t: torch.Tensor) -> torch.dtype:
    """float64 for a float64 x_t (an fp64 chain keeps its precision), else float32."""
    return torch.float64 if x_t.dtype == torch.float64 else torch.float32


class _Reference(nn.Module):
    """Shared plumbing: per-row alphabar lookup, float64 compute, x_0 -> eps (DDPM eq. 4)."""

    def __init__(self, schedule: Schedule, chunk_elements: int = CHUNK_ELEMENTS, prediction: str = "eps"):
        super().__init__()
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction {prediction!r}")
        self.chunk_elements = int(chunk_elements)
        self.prediction = prediction
        self.T = schedule.T
        self.register_buffer("alphabar", schedule.alphabar.to(torch.float64).clone())

    def _abar(self, t: torch.Tensor | int, n: int) -> torch.Tensor:
        """alphabar_t per row as an (n, 1) float64 column; t is 1-based (scalar or (n,))."""
        t = torch.as_tensor(t, device=self.alphabar.device).long()
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
        if n and (int(t.min()) < 1 or int(t.max()) > self.T):
            # A 0 would silently index alphabar[-1], the noisiest t.
            raise ValueError(f"t must lie in 1..{self.T}, got {int(t.min())}..{int(t.max())}")
        return self.alphabar[t - 1].unsqueeze(1)

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x0_hat = E[x_0 | x_t] under this reference's data model, float64, shape of x_t."""
        x = x_t.to(self.alphabar.device, torch.float64).flatten(1)
        abar = self._abar(t, x.shape[0])
        return self._x0(x, abar).view(x_t.shape)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t.to(self.alphabar.device, torch.float64).flatten(1)
        abar = self._abar(t, x.shape[0])
        if self.prediction == "eps":
            out = self._eps(x, abar)
        else:
            out = target_from_x0(x, self._x0(x, abar), abar, self.prediction)
        return out.view(x_t.shape).to(x_t.device, output_dtype(x_t))

    def _eps(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        # DDPM eq. 4 solved for eps: eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)
        return (x - abar.sqrt() * self._x0(x, abar)) / (1 - abar).sqrt()

    def _x0(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] for flattened float64 x (n, D) and per-row abar (n, 1)."""
        raise NotImplementedError


def target_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The target ``prediction`` implied by x_t and an estimate of x_0, in float64: eps from DDPM
    eq. 4, v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022 sec. 4). ``abar`` is
    alphabar_t per row, broadcast against x_t; at abar = 0 eps is x_t and v is -x_0."""
    if prediction == "x0":
        return x0
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    if prediction == "eps":
        return eps
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def _as_training_matrix(train_x0: torch.Tensor) -> torch.Tensor:
    """N x C x H x W model-space images -> N x D, refusing uint8 levels (a silent 0..255 scale)."""
    if train_x0.dim() != 4:
        raise ValueError(f"train_x0 must be N x C x H x W, got shape {tuple(train_x0.shape)}")
    if not train_x0.is_floating_point():
        raise ValueError("train_x0 must be float images in model space [-1, 1]; use ImageData.to_model_space")
    if train_x0.shape[0] < 1:
        raise ValueError("train_x0 holds no images")
    return train_x0.detach().flatten(1)


def _rows_per_chunk(per_row: int, budget: int) -> int:
    return max(1, budget // max(per_row, 1))


class PixelwiseDenoiser(_Reference):
    """Exact per-pixel Bayes denoiser: each pixel j independently, under its empirical level
    histogram p_j(k) over the training set, E[x_0j | x_tj] = sum_k w_k v_k with
    w_k ∝ p_j(k) N(x_tj; sqrt(abar) v_k, 1 - abar) and v_k = -1 + 2k/(levels-1). Optimal among
    denoisers that look at one pixel at a time (no spatial context), so it is the bound a model
    must beat at small t, where one pixel's value already pins its level: on 17-level digits at
    t = 1 its loss is ~0. With levels=256 it is the histogram version for 8-bit or continuous
    data. Cost: fitting is one pass (a bincount) over the training set; a forward is
    O(N D levels) time and memory, chunked over the query images.
    """

    def __init__(
        self,
        schedule: Schedule,
        train_x0: torch.Tensor,
        levels: int,
        chunk_elements: int = CHUNK_ELEMENTS,
        prediction: str = "eps",
    ):
        super().__init__(schedule, chunk_elements, prediction)
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        train = _as_training_matrix(train_x0)
        n, d = train.shape
        self.levels = int(levels)
        counts = torch.zeros(d * levels, dtype=torch.int64, device=train.device)
        offsets = torch.arange(d, device=train.device) * levels
        step = _rows_per_chunk(d, self.chunk_elements)
        for lo in range(0, n, step):
            chunk = train[lo : lo + step].to(torch.float64)
            # model space -> nearest level: inverts to_model_space, bins off-grid data
            k = ((chunk + 1) / 2 * (levels - 1)).round().clamp(0, levels - 1).long()
            counts += torch.bincount((k + offsets).flatten(), minlength=d * levels)
        prior = counts.view(d, levels).to(torch.float64) / n
        self.register_buffer("log_prior", prior.clamp(min=_LOG_FLOOR).log())
        self.register_buffer("values", -1 + 2 * torch.arange(levels, dtype=torch.float64) / (levels - 1))

    def _x0(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        d, levels = self.log_prior.shape
        step = _rows_per_chunk(d * levels, self.chunk_elements)
        for lo in range(0, x.shape[0], step):
            xc, ac = x[lo : lo + step, :, None], abar[lo : lo + step, :, None]
            # log p_j(k) + log N(x_tj; sqrt(abar) v_k, 1 - abar), up to a constant in k (DDPM eq. 4)
            logits = self.log_prior - (xc - ac.sqrt() * self.values) ** 2 / (2 * (1 - ac))
            out[lo : lo + step] = torch.softmax(logits, dim=2) @ self.values
        return out


class GaussianDenoiser(_Reference):
    """Linear MMSE (Wiener) denoiser of the Gaussian N(mu, Sigma) fitted to the training
    images (maximum likelihood, Sigma with 1/N): E[x_0 | x_t] = mu + Sigma sqrt(abar)
    (abar Sigma + (1 - abar) I)^{-1} (x_t - sqrt(abar) mu). Optimal for Gaussian data, and the
    best linear (affine) denoiser for any data with that mean and covariance, so a model worse
    than it has not learnt the second-order statistics. With Sigma = U diag(lam) U^T computed
    once, each t is a diagonal filter in the eigenbasis. Cost: fitting O(N D^2 + D^3) (the
    covariance and its eigendecomposition) and D^2 float64 of memory; a forward is two D x D
    matmuls. Above ``max_full_dim`` dimensions the covariance is diagonal (per-pixel variance),
    recorded in ``approximation``.
    """

    def __init__(
        self,
        schedule: Schedule,
        train_x0: torch.Tensor,
        max_full_dim: int = 4096,
        chunk_elements: int = CHUNK_ELEMENTS,
        prediction: str = "eps",
    ):
        super().__init__(schedule, chunk_elements, prediction)
        train = _as_training_matrix(train_x0)
        n, d = train.shape
        self.full = d <= max_full_dim
        self.approximation = "" if self.full else "diagonal covariance (D > max_full_dim)"
        step = _rows_per_chunk(d, self.chunk_elements)
        mean = torch.zeros(d, dtype=torch.float64, device=train.device)
        for lo in range(0, n, step):
            mean += train[lo : lo + step].to(torch.float64).sum(0)
        mean /= n
        # Two passes (mean first, then centred products): one-pass E[xx^T] - mu mu^T cancels.
        cov = torch.zeros((d, d) if self.full else (d,), dtype=torch.float64, device=train.device)
        for lo in range(0, n, step):
            centred = train[lo : lo + step].to(torch.float64) - mean
            cov += centred.T @ centred if self.full else (centred**2).sum(0)
        cov /= n
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        if self.full:
            lam, vecs = torch.linalg.eigh(cov)
        else:
            lam, vecs = cov.clone(), torch.empty(0, dtype=torch.float64, device=train.device)
        # eigh returns tiny negative eigenvalues for a singular Sigma (constant border pixels)
        self.register_buffer("eigenvalues", lam.clamp(min=0))
        self.register_buffer("eigenvectors", vecs)

    def _filter(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """U diag(gain) U^T x per row (gain is (n, D)); just gain * x when Sigma is diagonal."""
        if not self.full:
            return gain * x
        return ((x @ self.eigenvectors) * gain) @ self.eigenvectors.T

    def _x0(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        lam = self.eigenvalues
        # Wiener gain per eigen-direction: sqrt(abar) lam / (abar lam + 1 - abar)
        gain = abar.sqrt() * lam / (abar * lam + 1 - abar)
        return self.mean + self._filter(x - abar.sqrt() * self.mean, gain)

    def _eps(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        # Putting x0_hat into DDPM eq. 4 gives eps_hat = U diag(g) U^T (x_t - sqrt(abar) mu) with
        # g = sqrt(1 - abar) / (abar lam + 1 - abar): no x_t - sqrt(abar) x0_hat cancellation.
        gain = (1 - abar).sqrt() / (abar * self.eigenvalues + 1 - abar)
        return self._filter(x - abar.sqrt() * self.mean, gain)

    def linear_map(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) with eps_hat = A x_t + b for flattened x_t at step t (A: D x D, b: D, float64).

        A = U diag(sqrt(1 - abar) / (abar lam + 1 - abar)) U^T and b = -sqrt(abar) A mu.
        """
        if not 1 <= int(t) <= self.T:
            raise ValueError(f"t must lie in 1..{self.T}, got {t}")
        abar = self.alphabar[int(t) - 1]
        gain = (1 - abar).sqrt() / (abar * self.eigenvalues + 1 - abar)
        if self.full:
            a = (self.eigenvectors * gain) @ self.eigenvectors.T
        else:
            a = torch.diag(gain)
        return a, -abar.sqrt() * (a @ self.mean)


class EmpiricalDenoiser(_Reference):
    """Exact Bayes denoiser of the training set itself (the empirical distribution, a sum of
    point masses): weights softmax_i(-||x_t - sqrt(abar) x0_i||^2 / (2 (1 - abar))) over the
    training images, x0_hat = sum_i w_i x0_i. It is the minimiser of the training loss, so it
    memorises: its DDPM samples reproduce training images, and its held-out loss at small t is
    poor. It bounds what a model can gain by overfitting. Cost: no fitting beyond storing the
    training set (float32); a forward is O(N_query N_train D) (one matmul), streamed over
    chunks of the training set with a running log-sum-exp.
    """

    def __init__(
        self, schedule: Schedule, train_x0: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS, prediction: str = "eps"
    ):
        super().__init__(schedule, chunk_elements, prediction)
        train = _as_training_matrix(train_x0).to(torch.float32)
        self.register_buffer("train_images", train.clone())
        self.register_buffer("train_sq_norms", (train.to(torch.float64) ** 2).sum(1))

    def _x0(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        n_train, d = self.train_images.shape
        q_step = min(max(x.shape[0], 1), 512)
        t_step = _rows_per_chunk(max(q_step, d), self.chunk_elements)
        out = torch.empty_like(x)
        for qlo in range(0, x.shape[0], q_step):
            xq, aq = x[qlo : qlo + q_step], abar[qlo : qlo + q_step]
            s, var = aq.sqrt(), 1 - aq
            # running log-sum-exp state: max logit, sum of weights, weighted sum of images
            top = torch.full_like(aq, -torch.inf)
            total = torch.zeros_like(aq)
            acc = torch.zeros_like(xq)
            for tlo in range(0, n_train, t_step):
                images = self.train_images[tlo : tlo + t_step].to(torch.float64)
                sq = self.train_sq_norms[tlo : tlo + t_step]
                # -||x - s x0_i||^2 / (2 var) = (2 s x.x0_i - s^2 ||x0_i||^2) / (2 var) - ||x||^2 / (2 var);
                # the last term is the same for every i, cancels in the softmax and is dropped,
                # which also avoids the ||a||^2 - 2ab + ||b||^2 cancellation at small var.
                logits = (2 * s * (xq @ images.T) - aq * sq) / (2 * var)
                new_top = torch.maximum(top, logits.max(1, keepdim=True).values)
                rescale = torch.exp(top - new_top)
                weights = torch.exp(logits - new_top)
                total = total * rescale + weights.sum(1, keepdim=True)
                acc = acc * rescale + weights @ images
                top = new_top
            out[qlo : qlo + q_step] = acc / total
        return out


class MedianDenoiser(_Reference):
    """Classical 3x3 median filter: x0_hat = median3x3(x_t / sqrt(abar)) per channel
    (replicate padding, so any image size works), clipped to [-1, 1]. Optimal for nothing in
    particular; it is the "does an off-the-shelf filter beat the UNet at small t" baseline, and
    it needs no training data. Cost: no fitting; a forward is O(9 N D) with a 9x unfold,
    chunked over the query images.
    """

    def __init__(self, schedule: Schedule, chunk_elements: int = CHUNK_ELEMENTS, prediction: str = "eps"):
        super().__init__(schedule, chunk_elements, prediction)

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        x = self._images(x_t)
        return self._median_x0(x, self._abar(t, x.shape[0]))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self._images(x_t)
        abar = self._abar(t, x.shape[0]).view(-1, 1, 1, 1)
        x0 = self._median_x0(x, abar.view(-1, 1))
        return target_from_x0(x, x0, abar, self.prediction).to(x_t.device, output_dtype(x_t))

    def _images(self, x_t: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 4:
            raise ValueError(f"MedianDenoiser needs N x C x H x W images, got shape {tuple(x_t.shape)}")
        return x_t.to(self.alphabar.device, torch.float64)

    def _median_x0(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        signal = abar.sqrt().view(-1, 1, 1, 1)
        # undo the signal scaling of eq. 4; at zero terminal SNR's t = T x_t holds no signal to
        # unscale, and the middle of the data range, 0, stands for x_0
        scaled = torch.where(signal > 0, x / signal, torch.zeros_like(x))
        out = torch.empty_like(scaled)
        step = _rows_per_chunk(9 * c * h * w, self.chunk_elements)
        for lo in range(0, n, step):
            chunk = scaled[lo : lo + step]
            padded = nn.functional.pad(chunk, (1, 1, 1, 1), mode="replicate")
            windows = nn.functional.unfold(padded, kernel_size=3).view(chunk.shape[0], c, 9, h * w)
            out[lo : lo + step] = windows.median(dim=2).values.view(chunk.shape)
        return out.clamp(-1.0, 1.0)


REFERENCES: dict[str, type[_Reference]] = {
    "pixelwise": PixelwiseDenoiser,
    "gaussian": GaussianDenoiser,
    "empirical": EmpiricalDenoiser,
    "median": MedianDenoiser,
}


def build_reference(
    name: str, schedule: Schedule, train_x0: torch.Tensor, levels: int, prediction: str = "eps"
) -> nn.Module:
    """The reference ``name`` fitted on ``train_x0`` (training images in model space [-1, 1]),
    answering in the target ``prediction`` (eps, x0 or v)."""
    if name == "pixelwise":
        return PixelwiseDenoiser(schedule, train_x0, levels, prediction=prediction)
    if name == "gaussian":
        return GaussianDenoiser(schedule, train_x0, prediction=prediction)
    if name == "empirical":
        return EmpiricalDenoiser(schedule, train_x0, prediction=prediction)
    if name == "median":
        return MedianDenoiser(schedule, prediction=prediction)
    raise ValueError(f"unknown reference denoiser {name!r}; choose one of {sorted(REFERENCES)}")


def reference_device(device: torch.device | str) -> torch.device:
    """Where a reference's float64 buffers can live: MPS has no float64, so there they stay on
    the CPU (forward moves x_t to them and returns eps on x_t's device)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
