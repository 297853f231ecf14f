"""Diagnostics (docs/design.md, "Metrics"): the per-t probe, the bits/dim bound and sample drift.

Every probe uses common random numbers: the caller passes the same held-out images and the
same noise to every arm, so a difference between arms is the models', not the dice's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .diffusion import predicted_eps, prior_kl_bits, q_sample, vlb_term_bits
from .files import atomic_write
from .schedule import Schedule

HIST_RANGE = (-1.5, 1.5)  # wide enough to show pixels escaping [-1, 1]


def probe_timesteps(T: int, count: int) -> list[int]:
    """The probe's t grid: every t when T <= 200, else ``count`` points mixing a geometric
    grid (the loss and VLB change fastest at small t) with an even one; always holds 1 and T.
    """
    if T <= 200:
        return list(range(1, T + 1))
    half = max(count // 2, 2)
    geometric = np.geomspace(1, T, half)
    even = np.linspace(1, T, count - half + 2)
    grid = {1, 2, T} | {int(round(v)) for v in np.concatenate([geometric, even])}
    return sorted(v for v in grid if 1 <= v <= T)


def trapezoid_sum(ts: np.ndarray, values: np.ndarray, lo: int, hi: int) -> float:
    """Sum over integer t in [lo, hi] of a curve known on the grid ``ts``, linearly
    interpolated between grid points (exact when the grid holds every t)."""
    every_t = np.arange(lo, hi + 1)
    return float(np.interp(every_t, ts, values).sum()) if len(every_t) else 0.0


@torch.no_grad()
def per_t_probe(
    model: torch.nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: list[int],
    *,
    sigma: str,
    levels: int,
    clip_x0: bool = False,
    chunk_size: int = 512,
    autocast=None,
    prediction: str = "eps",
) -> pd.DataFrame:
    """One row per t: noise-prediction loss, bias of the predicted noise, and L_t in bits/dim.

    ``x0`` (held-out images in [-1, 1]) and ``noise`` (same shape) are fixed by the caller. The
    model's output is read as ``prediction`` and turned into eps-hat (diffusion.predicted_eps),
    so loss_mse and the eps statistics mean the same for every target; ``wt`` is the weight of
    L_{t-1} in the target's own space (Schedule.vlb_weights).
    """
    device = x0.device
    tables = schedule.on(device)
    reverse_log_variance = schedule.bound_variance(sigma).log().to(device, torch.float32)
    wt = schedule.vlb_weights(sigma, prediction)
    rows = []
    for t_now in timesteps:
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        vlb_parts = []
        for lo in range(0, x0.shape[0], chunk_size):
            x0_c, eps_c = x0[lo : lo + chunk_size], noise[lo : lo + chunk_size]
            t = torch.full((x0_c.shape[0],), t_now, dtype=torch.long, device=device)
            xt = q_sample(tables, x0_c, t, eps_c)
            if autocast is not None:
                with autocast():
                    output = model(xt, t).float()
            else:
                output = model(xt, t).float()
            eps_pred = predicted_eps(tables, xt, t, output, prediction)
            err = eps_pred - eps_c
            sums += torch.stack(
                [
                    (err**2).sum(),
                    eps_pred.sum(),
                    (eps_pred**2).sum(),
                    err.sum(),
                    torch.tensor(float(err.numel()), device=device),
                ]
            ).double()
            vlb_parts.append(
                vlb_term_bits(tables, x0_c, xt, t, output, reverse_log_variance, levels, clip_x0, prediction)
            )
        sq_err, s_pred, s_pred2, s_err, count = sums.tolist()
        pred_mean = s_pred / count
        err_mean = s_err / count
        rows.append(
            dict(
                t=t_now,
                alphabar=float(schedule.alphabar[t_now - 1]),
                snr=float(schedule.snr()[t_now - 1]),
                wt=float(wt[t_now - 1]),
                loss_mse=sq_err / count,
                eps_pred_mean=pred_mean,
                eps_pred_std=max(s_pred2 / count - pred_mean**2, 0.0) ** 0.5,
                err_mean=err_mean,
                err_std=max(sq_err / count - err_mean**2, 0.0) ** 0.5,
                vlb_bits=float(torch.cat(vlb_parts).mean()),
            )
        )
    return pd.DataFrame(rows)


def bits_per_dim_bound(schedule: Schedule, per_t: pd.DataFrame, x0: torch.Tensor) -> dict[str, float]:
    """The variational bound L_T + sum_{t>=2} L_{t-1} + L_0 in bits/dim (DDPM eq. 5).

    ``per_t`` must hold t = 1 (L_0). The middle sum is interpolated between probed t when
    the grid does not hold every t (exact for T <= 200 with the default grid).
    """
    frame = per_t.sort_values("t")
    ts, bits = frame["t"].to_numpy(), frame["vlb_bits"].to_numpy()
    if ts[0] != 1:
        raise ValueError("the probe grid must include t = 1 for L_0")
    prior = float(prior_kl_bits(schedule.on(x0.device), x0).mean())
    l0 = float(bits[0])
    middle = trapezoid_sum(ts, bits, 2, schedule.T)
    return {"bpd": prior + l0 + middle, "prior_bits": prior, "l0_bits": l0, "diffusion_bits": middle}


BOUND_TIMESTEPS = 200  # L_{t-1} terms evaluated for the final bound: every t up to T = 201


def stratified_timesteps(T: int, budget: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(the t to evaluate, the stratum each stands for) over t = 2..T: every t when
    T - 1 <= budget; else the first budget // 2 t exactly (strata of one) and one t drawn
    uniformly from each of the remaining strata, contiguous and of near-equal size, over the
    rest. Why exact at small t: L_{t-1} falls by orders of magnitude over the first few t, so
    one draw from a wide stratum there dominated the variance (an SE of 0.58 bits/dim at
    T = 1000 with 200 equal strata on digits)."""
    every = np.arange(2, T + 1)
    if len(every) <= budget:
        return every.tolist(), [1] * len(every)
    exact = budget // 2
    strata = np.array_split(every[exact:], budget - exact)
    picks = [int(part[torch.randint(len(part), (1,), generator=generator).item()]) for part in strata]
    return every[:exact].tolist() + picks, [1] * exact + [len(part) for part in strata]


def diffusion_bits_estimate(bits: np.ndarray, sizes: list[int]) -> tuple[float, float]:
    """sum_{t=2..T} L_{t-1} from one draw per stratum: sum_h N_h L(t_h), unbiased because each
    t_h is uniform in its stratum; its standard error from the collapsed-strata estimator over
    the drawn strata (adjacent ones paired; conservative). Strata of one t are exact and add
    no variance; all of them: exact, SE 0."""
    sizes = np.asarray(sizes)
    totals = sizes * np.asarray(bits, dtype=float)
    drawn = totals[sizes > 1]
    if drawn.size == 0:
        return float(totals.sum()), 0.0
    if drawn.size == 1:  # nothing to pair it with: no estimate of its spread
        return float(totals.sum()), math.nan
    pairs = drawn[: len(drawn) // 2 * 2].reshape(-1, 2)
    variance = float(((pairs[:, 0] - pairs[:, 1]) ** 2).sum())
    if len(drawn) % 2:  # an odd stratum out: pair it with its neighbour once more
        variance += float((drawn[-1] - drawn[-2]) ** 2)
    return float(totals.sum()), variance**0.5


def heldout_loss(schedule: Schedule, per_t: pd.DataFrame) -> float:
    """E_t[loss_mse] over uniform t: the held-out L_simple, interpolated over the grid."""
    frame = per_t.sort_values("t")
    return trapezoid_sum(frame["t"].to_numpy(), frame["loss_mse"].to_numpy(), 1, schedule.T) / schedule.T


def pixel_statistics(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std, p01, p50, p99, frac_out) and a fixed-bin histogram of all pixel values."""
    flat = x.detach().float().flatten()
    # torch.quantile refuses inputs above 2**24 elements; a strided subset is plenty there
    subset = flat if flat.numel() <= 2**24 else flat[:: flat.numel() // 2**24 + 1]
    q = torch.quantile(subset, torch.tensor([0.01, 0.5, 0.99], device=flat.device))
    stats = torch.stack([flat.mean(), flat.std(), q[0], q[1], q[2], (flat.abs() > 1).float().mean()])
    hist = torch.histc(flat.clamp(*HIST_RANGE), bins=bins, min=HIST_RANGE[0], max=HIST_RANGE[1])
    return stats, hist


STAT_NAMES = ["mean", "std", "p01", "p50", "p99", "frac_out"]


def per_pixel_std(x: torch.Tensor) -> torch.Tensor:
    """The std of x across images at each pixel (C x H x W position; unbiased), as the root of
    its mean square over pixels: the "per-pixel std" of Ning et al. (2024) without the bias a
    mean of square roots has at few images. Unlike pixel_statistics' std it leaves out how the
    pixels' means differ (a dark border against a bright centre). NaN for fewer than two images."""
    if x.shape[0] < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=x.device)
    return x.detach().flatten(1).double().var(dim=0).mean().sqrt()


def eps_rms(eps: torch.Tensor) -> torch.Tensor:
    """||eps||_2 / sqrt(D) over a population: the root mean square of every predicted value.
    The exposure-bias measure of Ning et al. (2024) compares ||eps_theta||_2 on sampling-chain
    states with that on forward states; per dimension it reads 1 for a unit Gaussian."""
    return eps.detach().double().pow(2).mean().sqrt()


@torch.no_grad()
def forward_eps_rms(
    denoiser: torch.nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: list[int],
    *,
    chunk_size: int = 512,
    autocast=None,
    prediction: str = "eps",
) -> pd.DataFrame:
    """``t``, ``q_eps_rms``: the RMS of ``denoiser``'s predicted noise on forward states
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPM eq. 4) of the images ``x0``, in their
    dtype (an fp64 chain's float64 copy is measured in float64 too); the output is read as
    ``prediction`` and turned into eps-hat (diffusion.predicted_eps)."""
    tables = schedule.on(x0.device, x0.dtype)
    rows = []
    for t_now in timesteps:
        total = torch.zeros((), dtype=torch.float64, device=x0.device)
        for lo in range(0, x0.shape[0], chunk_size):
            x0_c, eps_c = x0[lo : lo + chunk_size], noise[lo : lo + chunk_size]
            t = torch.full((x0_c.shape[0],), t_now, dtype=torch.long, device=x0.device)
            xt = q_sample(tables, x0_c, t, eps_c)
            if autocast is not None:
                with autocast():
                    output = denoiser(xt, t).float()
            else:
                output = denoiser(xt, t)
            eps_pred = predicted_eps(tables, xt, t, output, prediction)
            total += eps_pred.double().pow(2).sum()
        rows.append((t_now, math.sqrt(float(total) / x0.numel())))
    return pd.DataFrame(rows, columns=["t", "q_eps_rms"])


def forward_eps_timesteps(visited: list[int], grid: list[int]) -> list[int]:
    """Where the predicted noise is also measured on forward states: for each t of the probe
    grid, the chain's visited t nearest it (ties to the smaller), so every measured t has the
    chain's value beside it; all visited t when there are no more of them than grid points."""
    visited = sorted(t for t in set(visited) if t >= 1)
    if len(visited) <= len(grid):
        return visited
    from .metrics import nearest_t

    return sorted({nearest_t(visited, g) for g in grid})


class DriftRecorder:
    """Observer for the sampler: statistics of x_t along the reverse chain, beside the same
    statistics of q(x_t) computed from held-out data with fixed noise.

    Call it as ``observer(t, x_t)``; statistics stay on the device until ``tables()``, so the
    sampling loop never waits on the host.
    """

    def __init__(
        self,
        schedule: Schedule,
        reference_x0: torch.Tensor,
        reference_noise: torch.Tensor,
        *,
        bins: int,
        hist_steps: int,
    ):
        self.schedule, self.bins = schedule, bins
        self.reference_x0, self.reference_noise = reference_x0, reference_noise
        T = schedule.T
        self.hist_ts = set(int(v) for v in np.linspace(0, T, min(hist_steps, T + 1)).round())
        self.ts: list[int] = []
        self.stats: list[torch.Tensor] = []
        self.hists: dict[int, torch.Tensor] = {}
        self.per_pixel_stds: list[torch.Tensor] = []
        self.eps_rms: dict[int, torch.Tensor] = {}

    def __call__(self, t: int, x: torch.Tensor) -> None:
        stats, hist = pixel_statistics(x, self.bins)
        self.ts.append(t)
        self.stats.append(stats)
        self.per_pixel_stds.append(per_pixel_std(x))
        if t in self.hist_ts:
            self.hists[t] = hist

    def observe_eps(self, t: int, x: torch.Tensor, eps: torch.Tensor) -> None:
        """The denoiser's output on the chain's state at t (before any eps scaling): its RMS,
        for the exposure-bias measure against forward states (``exposure_table``)."""
        self.eps_rms[t] = eps_rms(eps)

    def reference(self, t: int) -> torch.Tensor:
        """Pixels of x_t ~ q(x_t|x_0) for the held-out images (x_0 itself at t = 0)."""
        if t == 0:
            return self.reference_x0
        tables = self.schedule.on(self.reference_x0.device)
        t_vec = torch.full((self.reference_x0.shape[0],), t, dtype=torch.long, device=self.reference_x0.device)
        return q_sample(tables, self.reference_x0, t_vec, self.reference_noise)

    def q_mean(self, ts: list[int]) -> np.ndarray:
        """The mean pixel of q(x_t) of the held-out images itself, sqrt(abar_t) x their mean
        (DDPM eq. 4, E[eps] = 0), without the draw noise of ``reference``'s eps (its SE is
        1 / sqrt(pixels drawn), 0.009 for 180 digits). The held-out mean is pixel_statistics'
        own, so at t = 0 this is ref_mean to the last bit, which the drift split's identity
        (final_mean_gap = start's share + own share) needs."""
        held_out_mean = float(pixel_statistics(self.reference_x0, 2)[0][0])
        alphabar = np.concatenate([[1.0], self.schedule.alphabar.double().cpu().numpy()])  # alphabar_0 = 1
        return np.sqrt(alphabar[np.asarray(ts, dtype=int)]) * held_out_mean

    def q_per_pixel_std(self, ts: list[int]) -> np.ndarray:
        """The per-pixel std of q(x_t) itself, exact given the held-out images: at pixel j,
        Var(x_t) = abar_t Var(x_0[j]) + (1 - abar_t) (DDPM eq. 4, eps independent of x_0), so the
        root of its mean over pixels is sqrt(abar_t v + 1 - abar_t), v the held-out images'
        per-pixel variance averaged over pixels (unbiased, as the chain's). Ning et al. (2024)
        compare with sqrt(1 - abar_t), the std of q(x_t | x_0) for ONE x_0 (v = 0): the reference
        of their chains started from a given x_0 and measured as x_t - sqrt(abar_t) x_0. A chain
        from N(0, I) knows no x_0, so the marginal's std is its reference: the same at large t,
        the data's per-pixel std rather than 0 at t = 0."""
        v = float(per_pixel_std(self.reference_x0) ** 2)
        alphabar = np.concatenate([[1.0], self.schedule.alphabar.double().cpu().numpy()])  # alphabar_0 = 1
        abar = alphabar[np.asarray(ts, dtype=int)]
        return np.sqrt(abar * v + 1.0 - abar)

    def exposure_table(self) -> pd.DataFrame:
        """Per reverse step: the chain's per-pixel std (``per_pixel_std``) and that of q(x_t)
        (``q_per_pixel_std``), and the RMS of the predicted noise on the chain's state
        (``eps_rms``; NaN at t = 0, where nothing is predicted)."""
        return pd.DataFrame(
            {
                "t": self.ts,
                "per_pixel_std": torch.stack(self.per_pixel_stds).cpu().numpy(),
                "q_per_pixel_std": self.q_per_pixel_std(self.ts),
                "eps_rms": [float(self.eps_rms[t]) if t in self.eps_rms else math.nan for t in self.ts],
            }
        )

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The ``drift`` and ``drift_hist`` tables (t from T down to 0)."""
        sampled = torch.stack(self.stats).cpu().numpy()
        ref_stats, ref_hists = [], {}
        for t in self.ts:
            stats, hist = pixel_statistics(self.reference(t), self.bins)
            ref_stats.append(stats)
            if t in self.hists:
                ref_hists[t] = hist
        ref = torch.stack(ref_stats).cpu().numpy()
        drift = pd.DataFrame(sampled, columns=STAT_NAMES)
        drift.insert(0, "t", self.ts)
        for j, name in enumerate(STAT_NAMES):
            drift[f"ref_{name}"] = ref[:, j]
        drift["q_mean"] = self.q_mean(self.ts)
        edges = np.linspace(*HIST_RANGE, self.bins + 1)
        hist_rows = []
        for t, hist in self.hists.items():
            counts = hist.cpu().numpy()
            ref_counts = ref_hists[t].cpu().numpy()
            for b in range(self.bins):
                hist_rows.append((t, edges[b], edges[b + 1], int(counts[b]), int(ref_counts[b])))
        drift_hist = pd.DataFrame(hist_rows, columns=["t", "bin_lo", "bin_hi", "count", "ref_count"])
        return drift, drift_hist


def drift_summary(drift: pd.DataFrame, samples: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Summary figures of drift: the final and largest mean gap, W1 of final pixel values, and
    the split of the mean gap by intervention (docs/design.md, "Drift, split"), from the
    chain started at q(x_T | x_0) of the held-out images with the sampled chain's eps and z
    (``qstart_mean``): the start's share is the sampled chain minus that chain, the model's own
    share is that chain minus q(x_t), so that final_mean_gap = start_final_mean_gap +
    own_final_mean_gap (both subtract the same held-out mean: q_mean at t = 0 is ref_mean)."""
    nan = float("nan")
    # float64 before any difference: the chains' statistics are float32, and the split's
    # identity should hold to float64 round-off, not float32's
    drift = drift.astype({c: "float64" for c in drift.columns if c != "t" and drift[c].dtype.kind == "f"})
    final = drift.loc[drift["t"] == 0]
    start = drift.loc[drift["t"] == drift["t"].max()]
    out = {
        "final_mean_gap": float((final["mean"] - final["ref_mean"]).iloc[0]) if len(final) else nan,
        "start_prior_mean_gap": nan,
        "start_final_mean_gap": nan,
        "own_final_mean_gap": nan,
        "own_max_mean_gap": nan,
        "max_mean_gap": float((drift["mean"] - drift["ref_mean"]).abs().max()),
        "final_std_gap": float((final["std"] - final["ref_std"]).iloc[0]) if len(final) else nan,
        "hist_w1": wasserstein1(samples.flatten(), data.flatten()),
        "sample_frac_out": float((samples.abs() > 1).float().mean()),
    }
    out.update(exposure_summary(drift))
    if {"qstart_mean", "q_mean"} <= set(drift) and len(final) and len(start):
        # after the model's first step: at t = T the chain is its start, the eps draw's noise
        own = drift.loc[drift["t"] < drift["t"].max()]
        out.update(
            start_prior_mean_gap=float((start["mean"] - start["qstart_mean"]).iloc[0]),
            start_final_mean_gap=float((final["mean"] - final["qstart_mean"]).iloc[0]),
            own_final_mean_gap=float((final["qstart_mean"] - final["q_mean"]).iloc[0]),
            own_max_mean_gap=float((own["qstart_mean"] - own["q_mean"]).abs().max()) if len(own) else nan,
        )
    return out


EXPOSURE_METRICS = ("eps_norm_excess_end", "eps_norm_excess_mean", "chain_std_gap_end", "chain_std_gap_mean")


def exposure_summary(drift: pd.DataFrame) -> dict[str, float]:
    """Per-run exposure-bias measures after Ning et al. (2024) from the drift table's
    per-t columns (docs/design.md, "Exposure bias"):

    - eps_norm_excess_end / _mean: eps_rms / q_eps_rms - 1 (the predicted noise's RMS on the
      chain's states over that on forward states at the same t) at the smallest measured t, and
      averaged over every t of the measured range (linear between measured t);
    - chain_std_gap_end / _mean: per_pixel_std - q_per_pixel_std at t = 0, and averaged over
      every t < T (linear between visited t; t = T is x_T's own draw)."""
    from .metrics import mean_over_t

    out = dict.fromkeys(EXPOSURE_METRICS, math.nan)
    if {"eps_rms", "q_eps_rms"} <= set(drift):
        ratio = (drift["eps_rms"] / drift["q_eps_rms"]).set_axis(drift["t"]).dropna().sort_index()
        if len(ratio):
            out["eps_norm_excess_end"] = float(ratio.iloc[0] - 1.0)
            out["eps_norm_excess_mean"] = mean_over_t(ratio - 1.0)
    if {"per_pixel_std", "q_per_pixel_std"} <= set(drift):
        gap = (drift["per_pixel_std"] - drift["q_per_pixel_std"]).set_axis(drift["t"]).sort_index()
        chain = gap[gap.index < gap.index.max()].dropna()
        if len(chain) and chain.index[0] == 0:
            out["chain_std_gap_end"] = float(chain.iloc[0])
        if len(chain):
            out["chain_std_gap_mean"] = mean_over_t(chain)
    return out


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 1-D Wasserstein-1 distance between two empirical distributions: the area
    between their quantile functions, evaluated on the merged support."""
    a = np.sort(a.detach().float().cpu().numpy())
    b = np.sort(b.detach().float().cpu().numpy())
    support = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, support[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, support[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(support)))


REFERENCE_CACHE_VERSION = "2"  # 2: loss_floor / floor_denoiser renamed loss_best_ref / best_ref_denoiser
_REFERENCE_MEMO: dict[str, pd.DataFrame] = {}


def reference_losses(
    schedule: Schedule,
    train_x0: torch.Tensor,
    levels: int,
    probe_x0: torch.Tensor,
    probe_noise: torch.Tensor,
    timesteps: list[int],
    *,
    cache_dir: Path | None = None,
) -> pd.DataFrame:
    """Per probed t, each parameter-free reference denoiser's loss on the SAME probe images,
    noise and t as the model (``ref_loss_<name>``), the lowest of them (``loss_best_ref``: an
    upper bound on the irreducible loss at t, since the Bayes-optimal denoiser can only do
    better) and which reference sets it (``best_ref_denoiser``).

    References do not change during training: the frame depends only on the training split,
    the schedule, the probe draw and the grid, so it is computed once per such combination
    and kept in memory and under ``cache_dir`` (a few kB per combination)."""
    from .metrics import REFERENCE_NAMES
    from .references import build_reference, reference_device

    key = _reference_key(schedule, train_x0, levels, probe_x0, probe_noise, timesteps)
    if key in _REFERENCE_MEMO:
        return _REFERENCE_MEMO[key].copy()
    path = Path(cache_dir) / f"reference_losses-{key}.parquet" if cache_dir is not None else None
    if path is not None and path.exists():
        frame = _read_reference_cache(path, key, timesteps)
        if frame is not None:
            _REFERENCE_MEMO[key] = frame
            return frame.copy()
    frame = pd.DataFrame({"t": timesteps})
    device = reference_device(probe_x0.device)
    # At zero terminal SNR a predicted eps gives no x_0 at t = T (the probe's L_{T-1} would be
    # 0/0), so there the references answer in v; loss_mse is of their eps-hat either way.
    prediction = "v" if float(schedule.alphabar[-1]) == 0.0 else "eps"
    for name in REFERENCE_NAMES:
        reference = build_reference(name, schedule, train_x0.to(device), levels, prediction).to(device)
        rows = per_t_probe(
            reference, schedule, probe_x0, probe_noise, timesteps, sigma="beta", levels=levels, prediction=prediction
        )
        frame[f"ref_loss_{name}"] = rows["loss_mse"].to_numpy()
    losses = frame[[f"ref_loss_{n}" for n in REFERENCE_NAMES]]
    frame["loss_best_ref"] = losses.min(axis=1)
    frame["best_ref_denoiser"] = [REFERENCE_NAMES[i] for i in np.argmin(losses.to_numpy(), axis=1)]
    _REFERENCE_MEMO[key] = frame
    if path is not None:
        _write_parquet_atomic(path, frame, {REFERENCE_KEY_METADATA: key})
    return frame.copy()


# The cache file records the key of the inputs it was computed from: a file that reached the
# name by a copy or a swap (another split's, another draw's) would otherwise give wrong losses
# silently, since the name is all a lookup checks.
REFERENCE_KEY_METADATA = b"ddpm_engine.reference_key"


def _read_reference_cache(path: Path, key: str, timesteps: list[int]) -> pd.DataFrame | None:
    """The cached frame when it is readable, made from these inputs and on this grid; else
    None (recomputed and rewritten)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError):
        return None
    if (table.schema.metadata or {}).get(REFERENCE_KEY_METADATA) != key.encode():
        return None
    frame = table.to_pandas()
    if "t" not in frame or frame["t"].tolist() != list(timesteps):
        return None
    return frame


def _reference_key(schedule, train_x0, levels, probe_x0, probe_noise, timesteps) -> str:
    h = hashlib.sha256(REFERENCE_CACHE_VERSION.encode())
    for tensor in (schedule.betas, train_x0, probe_x0, probe_noise):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    h.update(f"{levels}:{list(timesteps)}".encode())
    return h.hexdigest()[:24]


def _write_parquet_atomic(path: Path, frame: pd.DataFrame, metadata: dict[bytes, str] | None = None) -> None:
    # A cache is a convenience: failing to write one must not fail the run.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        extra = {k: v.encode() for k, v in metadata.items()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    try:
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    except OSError:
        pass
