"""Every column a run emits, declared once: name, table, unit, which way is better, definition.

This is the registry the harness derives from: the Parquet schema documentation, the
report's metric columns and stars, the metrics a study may tune or state hypotheses on, and
the direction of tuning. A test runs the engine and asserts that what it emits is exactly
what is declared here, so a new metric is one line here plus the code computing it.

It is a table rather than decorations on the computing functions because the harness reads
it before any worker starts, and the modules that compute (diagnostics, quality, training)
import torch, which costs seconds; each entry names its ``source`` instead.

The module also holds the per-t summaries (``per_t_summary``): small pandas functions that
turn the final probe's per-t curve into per-run numbers (the seed's observations F1 and F2),
so the engine emits them and the harness can test hypotheses on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pandas and numpy load on use: `harness` validates study files against this table
    import pandas as pd

Better = Literal["lower", "higher", "zero"]

# The version of how finished runs are measured (the final probe, sampling, drift, quality).
# Bump it when a measure changes: `harness run` then re-measures finished runs from their final
# checkpoints instead of training them again (docs/design.md, "Re-measure, don't retrain").
# 1: up to 2026-11-29 (one evaluation draw shared by every seed). 2: per-replicate draws.
# 3: drift split by intervention (own_* and start_*), memorised_frac, signed shortfall_t_small,
# the best reference (loss_best_ref) in place of "loss_floor". 4: saturation split by end
# (sat_low_* black, sat_high_* white). 5: loss_t_le_10 (the loss over the smallest t, for
# train.t_range specialists), seconds_per_sample, the exposure-bias measures after Ning et
# al. 2024 (the predicted noise's RMS on chain against forward states, eps_norm_excess_*; the
# chain's per-pixel std against q(x_t)'s, chain_std_gap_*), the brightness spread
# (brightness_std, ref_brightness_std, brightness_std_gap) and the per-t wt in the space of
# objective.prediction.
MEASURE_VERSION = 5

# loss_t_le_10 averages the per-t loss over t = 1..SMALL_T_MAX: the range a small-t specialist
# (train.t_range [1, 10]) is trained on, in the region where the seed's loss shortfall lies.
SMALL_T_MAX = 10

# The summary of a run is the single row of this table (and its final MLflow scalars).
PER_RUN_TABLE = "quality"
# The parameter-free reference denoisers of ddpm_engine.references, in report order.
REFERENCE_NAMES = ("pixelwise", "gaussian", "empirical", "median")


@dataclass(frozen=True)
class Metric:
    name: str
    table: str
    unit: str
    better: Better | None  # None: a description of the run (a setting, a count, a t)
    definition: str
    source: str = ""  # the engine function that computes it
    cost: bool = False  # seconds, throughput, memory: shown, never starred (timing noise is no effect)
    group: str = ""  # report section of a per-run metric ("" = not a report column)
    label: str = ""  # short column label in the report
    # Exact given the config: the same number for every seed by construction (a closed form of
    # the schedule and data, a count), so hypotheses judge it by its value. An estimated metric
    # whose seeds happen to agree (a discrete one) has no variance estimate, and is judged by
    # the sign test instead (harness.hypotheses).
    exact: bool = False
    # "log": positive and right-skewed (losses, distances): hypotheses and effects are judged on
    # log values, so an effect is a ratio arm / baseline and a mean is a geometric mean.
    scale: Literal["linear", "log"] = "linear"
    # What the value is measured in besides the model (MEASURED_IN): "objective", the run's own
    # training objective (objective.* and train.t_range), and "noise_levels", its forward
    # process (alphabar_1..T: diffusion.* but the reverse variance). Two arms that differ in one
    # of these measure different quantities in the metric (an eps MSE averaged over other noise
    # levels is another task, not a better or worse model), so reports and hypotheses compare
    # it only between arms that agree on them.
    measured_in: tuple[str, ...] = ()

    @property
    def per_run(self) -> bool:
        return self.table == PER_RUN_TABLE

    def objective(self, value: float) -> float:
        """The value an optimiser should minimise or maximise: |value| for a signed gap
        (closer to zero is better), else the value itself."""
        return abs(value) if self.better == "zero" else value

    @property
    def direction(self) -> str | None:
        """Optuna's study direction for this metric."""
        if self.better is None:
            return None
        return "maximize" if self.better == "higher" else "minimize"


# the parts of a run's config a metric can be measured in (Metric.measured_in), in words
MEASURED_IN = {
    "objective": "objectives (objective.*, train.t_range)",
    "noise_levels": "noise levels (diffusion.*: T and the schedule)",
}


def measurement_basis(config: dict) -> dict[str, str]:
    """What a run's metrics are measured in (MEASURED_IN), from its resolved config as a dict:
    each part as a comparable string. The reverse variance (diffusion.sigma) is left out: only
    sampling uses it, so it changes no loss."""
    diffusion = {k: v for k, v in (config.get("diffusion") or {}).items() if k != "sigma"}
    objective = {"objective": config.get("objective"), "t_range": (config.get("train") or {}).get("t_range")}
    return {
        "objective": json.dumps(objective, sort_keys=True),
        "noise_levels": json.dumps(diffusion, sort_keys=True),
    }


def _m(table, name, unit, better, definition, source="", **kw) -> Metric:
    return Metric(name, table, unit, better, definition, source, **kw)


_LOSS, _DRIFT, _QUALITY, _PER_T, _COST = "Loss and bound", "Sample drift", "Sample quality", "Per-t probe", "Cost"

# fmt: off
DECLARED: list[Metric] = [
    # ---- dataset: one row per run, the training split (data.describe_split); MLflow gets it as the run's dataset input
    _m("dataset", "name", "", None, "data set name: digits, fashion_mnist, mnist, image_folder:FOLDER (its last path part), npz:STEM (the file name without .npz) or torchvision:SET", "data.describe_split"),
    _m("dataset", "digest", "", None, "16 hex of sha256 over the training images (shape, levels, bytes) and the split definition (held-out fraction, split seed, image cap; the IDX sets, whose split is their files', without the held-out fraction)", "data.split_digest"),
    _m("dataset", "source", "", None, "where the images come from: the loader (sklearn.datasets.load_digits) or the resolved path", "data.data_source"),
    _m("dataset", "train_images", "images", None, "images in the training split"),
    _m("dataset", "heldout_images", "images", None, "images held out"),
    _m("dataset", "channels", "", None, "channels per image"),
    _m("dataset", "image_size", "pixels", None, "side of the square images"),
    _m("dataset", "levels", "", None, "quantization levels of a pixel"),
    # ---- train: one row per logged step (training.Trainer.flush_window)
    _m("train", "step", "step", None, "optimizer step"),
    _m("train", "loss", "loss", "lower", "mean training loss since the last row", "training.Trainer.flush_window"),
    _m("train", "lr", "", None, "learning rate"),
    _m("train", "grad_norm", "", None, "mean gradient norm before clipping"),
    _m("train", "images_per_s", "images/s", "higher", "training throughput since the last row", cost=True),
    # ---- per_t: one row per probe x t (diagnostics.per_t_probe; the reference losses from diagnostics.reference_losses)
    _m("per_t", "step", "step", None, "training step of the probe"),
    _m("per_t", "t", "", None, "timestep (1..T)"),
    _m("per_t", "alphabar", "", None, "alphabar_t"),
    _m("per_t", "snr", "", None, "alphabar_t / (1 - alphabar_t)"),
    _m("per_t", "wt", "", None, "DDPM eq. 12 weight of L_t for the run's sigma, in the space of the run's objective.prediction (eps: eq. 12 itself)"),
    _m("per_t", "loss_mse", "MSE", "lower", "per-dimension MSE of the predicted noise on held-out images (eps-hat, converted from the model's output when it predicts x0 or v)"),
    _m("per_t", "eps_pred_mean", "", "zero", "mean of the predicted noise (ideal 0)"),
    _m("per_t", "eps_pred_std", "", None, "std of the predicted noise (1 where the noise is identifiable from x_t)"),
    _m("per_t", "err_mean", "", "zero", "mean of predicted minus true noise"),
    _m("per_t", "err_std", "", "lower", "std of predicted minus true noise"),
    _m("per_t", "vlb_bits", "bits/dim", "lower", "L_{t-1} (t >= 2) or L_0 (t = 1) in bits/dim (DDPM eq. 5)"),
    _m("per_t", "ref_loss_pixelwise", "MSE", "lower", "loss_mse of the parameter-free pixelwise reference denoiser on the same probe images, noise and t", "diagnostics.reference_losses"),
    _m("per_t", "ref_loss_gaussian", "MSE", "lower", "loss_mse of the parameter-free gaussian reference denoiser on the same probe images, noise and t", "diagnostics.reference_losses"),
    _m("per_t", "ref_loss_empirical", "MSE", "lower", "loss_mse of the parameter-free empirical reference denoiser on the same probe images, noise and t", "diagnostics.reference_losses"),
    _m("per_t", "ref_loss_median", "MSE", "lower", "loss_mse of the parameter-free median reference denoiser on the same probe images, noise and t", "diagnostics.reference_losses"),
    _m("per_t", "loss_best_ref", "MSE", "lower", "the lowest reference loss at t (the best reference): an upper bound on the irreducible loss, which the Bayes-optimal denoiser can only undercut", "diagnostics.reference_losses"),
    _m("per_t", "best_ref_denoiser", "", None, "the reference denoiser that sets loss_best_ref", "diagnostics.reference_losses"),
    # ---- probe: one row per probe (diagnostics.bits_per_dim_bound, heldout_loss)
    _m("probe", "step", "step", None, "training step of the probe"),
    _m("probe", "bpd", "bits/dim", "lower", "bits/dim bound L_T + sum L_t + L_0 at this probe (L_t interpolated between probed t; the final bpd in quality is not)"),
    _m("probe", "prior_bits", "bits/dim", "lower", "L_T at this probe"),
    _m("probe", "l0_bits", "bits/dim", "lower", "L_0 at this probe"),
    _m("probe", "diffusion_bits", "bits/dim", "lower", "sum of L_1..L_{T-1} at this probe"),
    _m("probe", "heldout_loss", "MSE", "lower", "held-out L_simple averaged over uniform t at this probe"),
    # ---- drift: one row per reverse step (diagnostics.DriftRecorder)
    _m("drift", "mean", "pixel", None, "mean pixel of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "std", "pixel", None, "pixel std of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "p01", "pixel", None, "1st percentile of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "p50", "pixel", None, "median of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "p99", "pixel", None, "99th percentile of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "frac_out", "pixel", None, "fraction of pixels outside [-1, 1] of the sampled x_t", "diagnostics.DriftRecorder"),
    _m("drift", "t", "", None, "reverse step: T..1, then 0 for the final sample"),
    _m("drift", "ref_mean", "pixel", None, "the same statistic (mean) of q(x_t) from held-out data"),
    _m("drift", "ref_std", "pixel", None, "the same statistic (std) of q(x_t) from held-out data"),
    _m("drift", "ref_p01", "pixel", None, "the same statistic (p01) of q(x_t) from held-out data"),
    _m("drift", "ref_p50", "pixel", None, "the same statistic (p50) of q(x_t) from held-out data"),
    _m("drift", "ref_p99", "pixel", None, "the same statistic (p99) of q(x_t) from held-out data"),
    _m("drift", "ref_frac_out", "pixel", None, "the same statistic (frac_out) of q(x_t) from held-out data"),
    _m("drift", "q_mean", "pixel", None, "sqrt(alphabar_t) x the held-out images' mean pixel (DDPM eq. 4): the mean of q(x_t) itself, without ref_mean's draw noise; at t = 0 it is ref_mean", "diagnostics.DriftRecorder"),
    _m("drift", "qstart_mean", "pixel", None, "mean pixel of x_t along the model's own chain started from x_T ~ q(x_T | x_0) of the held-out images (cycled to sample.num_samples), x_T = sqrt(alphabar_T) x_0 + sqrt(1 - alphabar_T) eps with the sampled chain's own eps and the same z at every step: the model's chain without the start's mismatch", "experiment.sample_with_drift"),
    _m("drift", "qstart_std", "pixel", None, "pixel std of that chain from q(x_T | x_0)", "experiment.sample_with_drift"),
    _m("drift", "qstart_frac_out", "", None, "fraction of the pixels of that chain from q(x_T | x_0) outside [-1, 1]", "experiment.sample_with_drift"),
    _m("drift", "gauss_chain_mean", "pixel", None, "mean pixel of x_t when the data's Gaussian (Wiener) denoiser runs through the same sampler from the same x_T and noise: a reference curve, not the model's share", "experiment.gauss_chain_drift"),
    _m("drift", "gauss_chain_std", "pixel", None, "pixel std of that Gaussian-denoiser chain (a reference curve)", "experiment.gauss_chain_drift"),
    _m("drift", "gauss_chain_frac_out", "", None, "fraction of the Gaussian-denoiser chain's pixels outside [-1, 1] (a reference curve)", "experiment.gauss_chain_drift"),
    _m("drift", "per_pixel_std", "pixel", None, "std across the sampled images of x_t at each pixel (unbiased), as the root of its mean square over pixels (Ning et al. 2024's per-pixel std; unlike std, it leaves out how the pixels' means differ)", "diagnostics.DriftRecorder"),
    _m("drift", "q_per_pixel_std", "pixel", None, "the same of q(x_t) itself, exact given the held-out images: sqrt(alphabar_t v + 1 - alphabar_t), v their per-pixel variance averaged over pixels (DDPM eq. 4); sqrt(1 - alphabar_t), Ning et al.'s reference, is that of q(x_t | x_0) for one x_0 (v = 0)", "diagnostics.DriftRecorder"),
    _m("drift", "eps_rms", "", None, "root mean square of the predicted noise on the sampled chain's x_t (eps-hat, the network's output read as objective.prediction, before sample.eps_scale divides it): ||eps_theta||_2 / sqrt(D) over the samples; NaN at t = 0", "diagnostics.DriftRecorder"),
    _m("drift", "q_eps_rms", "", None, "the same RMS on forward states q(x_t | x_0) of the probe's held-out images and noise, at the visited t nearest each probe-grid t (NaN at other t); eps_rms / q_eps_rms is Ning et al. 2024's exposure-bias ratio", "experiment.forward_eps"),
    # ---- drift_hist: one row per reverse step x bin
    _m("drift_hist", "t", "", None, "reverse step"),
    _m("drift_hist", "bin_lo", "pixel", None, "bin lower edge"),
    _m("drift_hist", "bin_hi", "pixel", None, "bin upper edge"),
    _m("drift_hist", "count", "pixels", None, "sampled pixels in the bin"),
    _m("drift_hist", "ref_count", "pixels", None, "q(x_t) pixels in the bin"),
    # ---- quality: the run"s summary, one row per run (the per-run metrics)
    _m("quality", "bpd", "bits/dim", "lower", "bits/dim bound L_T + sum L_t + L_0 of the final weights: every t for T <= 201, else an unbiased stratified estimate over t (no interpolation)", "experiment.final_bound", group=_LOSS, label="bits/dim"),
    _m("quality", "prior_bits", "bits/dim", "lower", "prior term L_T: KL(q(x_T|x_0) || N(0, I))", "diagnostics.bits_per_dim_bound", group=_LOSS, label="prior L_T (bits/dim)", exact=True),
    _m("quality", "bpd_se", "bits/dim", None, "standard error of bpd: 0 when every L_t is evaluated (T <= 201), else of the stratified estimate over t", "experiment.final_bound"),
    _m("quality", "l0_bits", "bits/dim", "lower", "decoder term L_0 at the final probe", "diagnostics.bits_per_dim_bound"),
    _m("quality", "diffusion_bits", "bits/dim", "lower", "sum of L_1..L_{T-1} of the final weights (as bpd: exact or stratified)", "experiment.final_bound"),
    _m("quality", "heldout_loss", "MSE", "lower", "held-out L_simple (eps MSE) averaged over uniform t at the final probe, over the run's own noise levels: comparable only between runs with the same T and schedule", "diagnostics.heldout_loss", group=_LOSS, label="held-out loss", scale="log", measured_in=("noise_levels",)),
    _m("quality", "final_loss", "loss", "lower", "mean training loss of the last four logged windows, in the run's own objective (objective.*, train.t_range) and noise levels: comparable only between runs trained on the same objective, T and schedule", "experiment", group=_LOSS, label="final train loss", scale="log", measured_in=("objective", "noise_levels")),
    _m("quality", "loss_t_small", "MSE", "lower", "loss_mse at the smallest probed t (final probe)", "metrics.per_t_summary", scale="log"),
    _m("quality", "loss_t_mid", "MSE", "lower", "loss_mse at the probed t nearest T/2 other than the smallest", "metrics.per_t_summary", scale="log"),
    _m("quality", "loss_t_le_10", "MSE", "lower", f"mean of loss_mse over every t from 1 to {SMALL_T_MAX} (linear between probed t; to T when T < {SMALL_T_MAX}; final probe): the loss over the smallest t, where the seed's shortfall lies and a train.t_range [1, 10] specialist is trained", "metrics.per_t_summary", scale="log"),
    _m("quality", "loss_small_minus_mid", "MSE", "lower", "loss_mse(smallest t) - loss_mse(t nearest T/2): positive when the model is worse at small t than mid t (F1)", "metrics.per_t_summary"),
    _m("quality", "best_ref_t_small", "MSE", "lower", "loss_best_ref at the smallest probed t (final probe): an upper bound on the irreducible loss there", "metrics.per_t_summary", scale="log"),
    _m("quality", "shortfall_t_small", "MSE", "lower", "loss_mse - loss_best_ref at the smallest probed t, signed: above 0 the model is short of what a parameter-free reference already gets; below 0 it beats the best reference (an upper bound on the irreducible loss, not the loss itself)", "metrics.per_t_summary"),
    _m("quality", "frac_t_above_best_ref", "", "lower", "fraction of probed t where the model's loss_mse is above loss_best_ref (an upper bound on the irreducible loss)", "metrics.per_t_summary"),
    _m("quality", "eps_bias_max", "", "lower", "largest |err_mean| over probed t (F2: predicted-noise bias)", "metrics.per_t_summary"),
    _m("quality", "eps_std_gap_small", "", "zero", "eps_pred_std - 1 at the smallest probed t (F2)", "metrics.per_t_summary"),
    _m("quality", "eps_std_gap_mean", "", "lower", "mean over every t of |eps_pred_std - 1|, linear between probed t (F2)", "metrics.per_t_summary"),
    _m("quality", "final_mean_gap", "pixel", "zero", "mean pixel of the final samples - mean pixel of the held-out data; = start_final_mean_gap + own_final_mean_gap", "diagnostics.drift_summary", group=_DRIFT, label="final mean gap"),
    _m("quality", "start_prior_mean_gap", "pixel", "zero", "mean of x_T ~ N(0, I) - mean of x_T ~ q(x_T | x_0) of the held-out images drawn with the same eps: the start's mismatch at t = T (about -sqrt(alphabar_T) x the held-out mean), without the x_T draw's noise", "diagnostics.drift_summary", group=_DRIFT, label="start gap at t = T"),
    _m("quality", "start_final_mean_gap", "pixel", "zero", "final mean of the sampled chain (from N(0, I)) - final mean of the model's chain from q(x_T | x_0) of the held-out images with the same eps and z: the start's share of final_mean_gap", "diagnostics.drift_summary", group=_DRIFT, label="start's share (final)"),
    _m("quality", "own_final_mean_gap", "pixel", "zero", "final mean of the model's chain from q(x_T | x_0) of the held-out images - the held-out mean: the model's own share of final_mean_gap", "diagnostics.drift_summary", group=_DRIFT, label="own share (final)"),
    _m("quality", "own_max_mean_gap", "pixel", "lower", "largest |mean of the model's chain from q(x_T | x_0) of the held-out images - q_mean| over t < T: the model's own drift along the chain (a mean over sample.num_samples images: its floor is their sampling noise)", "diagnostics.drift_summary", group=_DRIFT, label="own max |mean gap|"),
    _m("quality", "max_mean_gap", "pixel", "lower", "largest |sampled mean - q(x_t) mean| along the chain (includes the start's mismatch at t = T and both chains' draw noise)", "diagnostics.drift_summary"),
    _m("quality", "final_std_gap", "pixel", "zero", "pixel std of the final samples - that of the held-out data", "diagnostics.drift_summary"),
    _m("quality", "hist_w1", "pixel", "lower", "Wasserstein-1 of final pixel values vs held-out data", "diagnostics.drift_summary", group=_DRIFT, label="histogram W1", scale="log"),
    _m("quality", "sample_frac_out", "", "lower", "fraction of final sample pixels outside [-1, 1]", "diagnostics.drift_summary"),
    _m("quality", "eps_norm_excess_end", "", "zero", "eps_rms / q_eps_rms - 1 at the smallest measured t (t = 1 for ancestral sampling): above 0 the network predicts more noise on its own chain's states than on forward states q(x_t) (Ning et al. 2024's exposure bias)", "diagnostics.exposure_summary", group=_DRIFT, label="eps norm excess (end)"),
    _m("quality", "eps_norm_excess_mean", "", "zero", "eps_rms / q_eps_rms - 1 averaged over every t of the measured range (linear between measured t)", "diagnostics.exposure_summary"),
    _m("quality", "chain_std_gap_end", "pixel", "zero", "per_pixel_std - q_per_pixel_std at t = 0: the final samples' per-pixel std against the held-out images'", "diagnostics.exposure_summary"),
    _m("quality", "chain_std_gap_mean", "pixel", "zero", "per_pixel_std - q_per_pixel_std averaged over every t < T (linear between visited t): above 0 the chain's states spread more than q(x_t)'s (Ning et al. 2024's exposure bias, against the marginal's std)", "diagnostics.exposure_summary", group=_DRIFT, label="chain std gap (mean)"),
    _m("quality", "sat_frac", "", None, "fraction of sample pixels at the lowest or highest of the data's levels after rounding and clipping (as a viewer sees them)", "quality.sample_quality", group=_DRIFT, label="saturated fraction"),
    _m("quality", "ref_sat_frac", "", None, "the same fraction for the training images (already on the levels)", "quality.sample_quality", exact=True),
    _m("quality", "sat_gap", "", "zero", "sat_frac - ref_sat_frac: positive = samples more saturated than the data (F3)", "quality.sample_quality"),
    _m("quality", "sat_low_frac", "", None, "fraction of sample pixels at the lowest of the data's levels after rounding and clipping (black: on a dark background, mostly background)", "quality.sample_quality"),
    _m("quality", "ref_sat_low_frac", "", None, "the same fraction for the training images", "quality.sample_quality", exact=True),
    _m("quality", "sat_low_gap", "", "zero", "sat_low_frac - ref_sat_low_frac: positive = more black pixels than the data (too dark at the background)", "quality.sample_quality", group=_DRIFT, label="black-pixel gap"),
    _m("quality", "sat_high_frac", "", None, "fraction of sample pixels at the highest of the data's levels after rounding and clipping (white)", "quality.sample_quality"),
    _m("quality", "ref_sat_high_frac", "", None, "the same fraction for the training images", "quality.sample_quality", exact=True),
    _m("quality", "sat_high_gap", "", "zero", "sat_high_frac - ref_sat_high_frac: positive = more white pixels than the data (too bright at the foreground)", "quality.sample_quality", group=_DRIFT, label="white-pixel gap"),
    _m("quality", "pixel_mean_gap", "pixel", "zero", "mean pixel of the samples - mean pixel of the training images", "quality.sample_quality"),
    _m("quality", "brightness_std", "pixel", None, "std over the samples of each image's mean pixel (unclipped, model space): how much the samples differ in overall brightness", "quality.sample_quality"),
    _m("quality", "ref_brightness_std", "pixel", None, "the same std over the training images", "quality.sample_quality", exact=True),
    _m("quality", "brightness_std_gap", "pixel", "zero", "brightness_std - ref_brightness_std: below 0 the samples' brightness spreads less than the data's, crowding around medium brightness (Lin et al. 2023: a schedule that leaves signal at t = T)", "quality.sample_quality", group=_DRIFT, label="brightness spread gap"),
    _m("quality", "fd", "", "lower", "Frechet distance in the features of the classifier of the data set's labels (trained once on its training split); downsampled pixels for data without labels", "quality.sample_quality", group=_QUALITY, label="Fréchet distance", scale="log"),
    _m("quality", "coverage", "", "higher", "fraction of the data set's classes produced by at least 20% of their fair share (its classifier's predictions; NaN without labels)", "quality.sample_quality", group=_QUALITY, label="class coverage"),
    _m("quality", "class_entropy", "bits", "higher", "entropy of the predicted-class histogram of the samples (the data set's classifier; NaN without labels)", "quality.sample_quality"),
    _m("quality", "confidence", "", "higher", "mean maximum softmax probability of the data set's classifier (NaN without labels)", "quality.sample_quality"),
    _m("quality", "memorised_frac", "", "lower", "fraction of samples whose nearest training image is closer than 1/3 of the second nearest (RMS pixel distance; the ratio test after Carlini et al. 2023): copies of training images, not blends or shifted copies", "quality.memorisation", group=_QUALITY, label="memorised fraction"),
    _m("quality", "nn_train_dist", "pixel", None, "mean RMS pixel distance of each sample to its nearest training image (0: copies)", "quality.memorisation", scale="log"),
    _m("quality", "nn_heldout_ratio", "", None, "nn_train_dist over the same mean distance of held-out images to the training set: near 0 the samples sit on training images; near 1 or above they are only as far from it as unseen data (so are shifted or blended training images), which is no evidence of generalising", "quality.memorisation", scale="log"),
    _m("quality", "params", "parameters", None, "model parameter count", "model.count_parameters", cost=True, group=_COST, label="parameters", exact=True),
    _m("quality", "bf16_autocast", "", None, "1.0 if the run trained and sampled under bf16 autocast", "experiment", exact=True),
    _m("quality", "images_per_s", "images/s", "higher", "median training throughput", "experiment", cost=True, group=_COST, label="images/s"),
    _m("quality", "train_seconds", "s", "lower", "wall time until the final probe", "experiment", cost=True),
    _m("quality", "sample_seconds", "s", "lower", "wall time of sampling", "experiment", cost=True),
    _m("quality", "seconds_per_sample", "s/sample", "lower", "sample_seconds / sample.num_samples: the sampler's cost of one image, comparable across sample counts", "experiment", cost=True, scale="log"),
    _m("quality", "seconds", "s", "lower", "wall time of the run in the engine", "experiment", cost=True, group=_COST, label="seconds"),
    _m("quality", "peak_memory_mb", "MB", "lower", "peak device memory (CUDA only; NaN on CPU)", "device", cost=True),
    _m("quality", "resumed_from_step", "step", None, "step the run resumed from (0 if it started fresh)", "experiment"),
    _m("quality", "train_steps", "steps", None, "optimizer steps trained", "experiment"),
    _m("quality", "train_images", "images", None, "training images seen", "experiment"),
    _m("quality", "train_loop_seconds", "s", "lower", "time inside training steps (the budget_by seconds clock)", "experiment", cost=True),
]
# fmt: on

TABLES: dict[str, dict[str, Metric]] = {}
for _metric in DECLARED:
    TABLES.setdefault(_metric.table, {})[_metric.name] = _metric

PER_RUN: dict[str, Metric] = TABLES[PER_RUN_TABLE]


def per_run_metric(name: str) -> Metric:
    return PER_RUN[name]


def report_columns() -> list[Metric]:
    """Per-run metrics shown as report columns, in declaration order."""
    return [m for m in PER_RUN.values() if m.group]


def tunable() -> list[str]:
    """Per-run metrics with a better direction that are not costs: what a study may tune."""
    return [m.name for m in PER_RUN.values() if m.better is not None and not m.cost]


# --------------------------------------------------------------------------------------
# Per-t summaries of the final probe


def nearest_t(ts, target: float) -> int:
    """The t of ``ts`` nearest ``target``; ties go to the smaller t."""
    return int(min(ts, key=lambda t: (abs(t - target), t)))


def mean_over_t(curve: pd.Series) -> float:
    """Mean of a per-t curve over every integer t from its first to its last probed t,
    linear between probed t: the value at a uniformly drawn t (the probe grid for T > 200
    crowds small t, and a plain mean over grid points would weight them by the grid)."""
    import numpy as np

    if curve.empty:
        return math.nan
    ts = curve.index.to_numpy(float)
    every = np.arange(int(ts[0]), int(ts[-1]) + 1)
    return float(np.interp(every, ts, curve.to_numpy(float)).mean())


def interpolated_to(curve: pd.Series, t_max: int) -> pd.Series:
    """The per-t curve cut at ``t_max``, with its linear interpolation at ``t_max`` itself when
    that t was not probed (so a mean over t <= t_max counts every t up to it)."""
    import numpy as np
    import pandas as pd

    head = curve[curve.index <= t_max]
    if t_max in curve.index or curve.index[-1] < t_max:
        return head
    end = float(np.interp(t_max, curve.index.to_numpy(float), curve.to_numpy(float)))
    return pd.concat([head, pd.Series([end], index=[t_max])])


def per_t_summary(per_t: pd.DataFrame) -> dict[str, float]:
    """Per-run numbers from the per-t rows of ONE probe (the final one): the seed's
    observations as metrics. F1: loss at the smallest t against mid t. F2: the largest
    predicted-noise bias over t, and the std's departure from 1 at small t and over all t.
    With the best reference's loss in the rows (an upper bound on the irreducible loss): the
    model's signed shortfall at the smallest t and the fraction of t where it is above it."""
    names = (
        "loss_t_small",
        "loss_t_le_10",
        "loss_t_mid",
        "loss_small_minus_mid",
        "best_ref_t_small",
        "shortfall_t_small",
        "frac_t_above_best_ref",
        "eps_bias_max",
        "eps_std_gap_small",
        "eps_std_gap_mean",
    )
    out = dict.fromkeys(names, math.nan)
    if per_t.empty or "t" not in per_t:
        return out
    frame = per_t.groupby("t").mean(numeric_only=True).sort_index()
    loss = frame["loss_mse"].dropna() if "loss_mse" in frame else None
    if loss is not None and len(loss) >= 2:
        t_small = int(loss.index[0])
        t_mid = nearest_t(loss.index[1:], int(frame.index.max()) / 2)  # never t_small itself
        out.update(
            loss_t_small=float(loss[t_small]),
            loss_t_mid=float(loss[t_mid]),
            loss_small_minus_mid=float(loss[t_small] - loss[t_mid]),
        )
    if loss is not None and not loss.empty and loss.index[0] <= SMALL_T_MAX:
        out["loss_t_le_10"] = mean_over_t(interpolated_to(loss, SMALL_T_MAX))
    if loss is not None and not loss.empty and "loss_best_ref" in frame and frame["loss_best_ref"].notna().any():
        best = frame["loss_best_ref"].reindex(loss.index)
        t_small = int(loss.index[0])
        out["best_ref_t_small"] = float(best[t_small])
        # Signed, never clipped: the best reference only bounds the irreducible loss from above,
        # so a model may beat it, and a hypothesis "shortfall above 0" needs the negative values
        # to be a fair test (clipping at 0 would bias every mean, and every CI, upwards).
        out["shortfall_t_small"] = float(loss[t_small] - best[t_small])
        out["frac_t_above_best_ref"] = float((loss > best).mean())
    if "err_mean" in frame and frame["err_mean"].notna().any():
        out["eps_bias_max"] = float(frame["err_mean"].abs().max())
    if "eps_pred_std" in frame:
        std = frame["eps_pred_std"].dropna()
        if not std.empty:
            out["eps_std_gap_small"] = float(std.iloc[0] - 1.0)
            out["eps_std_gap_mean"] = mean_over_t((std - 1.0).abs())
    return out
