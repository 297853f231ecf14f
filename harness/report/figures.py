"""The report's figures: each a function of the study's results returning a matplotlib
Figure, or None when there is nothing to draw (the page then shows a note).

Figures read only ``harness.report.results.StudyResults``; page assembly lives in ``harness.report.page``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .results import StudyResults  # noqa: E402

log = logging.getLogger(__name__)

DPI = 110
FIG_WIDTH = 10.5  # inches: about 1150 px at DPI, for a ~1200 px page


def fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def arm_palette(arms: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("colorblind" if len(arms) <= 10 else "husl", max(len(arms), 1))
    return dict(zip(arms, colours))


def _arms_with(frame: pd.DataFrame, arms: list[str], column: str | None = None) -> list[str]:
    if frame.empty or "arm" not in frame or (column is not None and column not in frame):
        return []
    have = frame if column is None else frame[frame[column].notna()]
    present = set(have["arm"])
    return [a for a in arms if a in present]


def _band(
    ax,
    frame: pd.DataFrame,
    x: str,
    y: str,
    arms: list[str],
    palette: dict,
    *,
    positive: bool = False,
    label_seeds: bool = True,
) -> bool:
    """Per arm: the mean over seeds as a line, the min..max over seeds as a band."""
    drew = False
    for arm in arms:
        rows = frame[(frame["arm"] == arm) & frame[y].notna()]
        if positive:
            rows = rows[rows[y] > 0]
        if rows.empty:
            continue
        g = rows.groupby(x)[y].agg(["mean", "min", "max"]).sort_index()
        seeds = rows["seed"].nunique()
        label = f"{arm} ({seeds} seed{'s' if seeds != 1 else ''})" if label_seeds else arm
        ax.plot(g.index, g["mean"], color=palette[arm], label=label, lw=1.6)
        if seeds > 1:
            ax.fill_between(g.index, g["min"], g["max"], color=palette[arm], alpha=0.2, lw=0)
        drew = True
    return drew


def _readable_log_axes(*axes) -> None:
    """Plain numbers (0.1, 2, 50) instead of 10^k on log and symlog axes."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes:
        if not ax.has_data():
            continue
        for axis, scale, limits in (
            (ax.xaxis, ax.get_xscale(), ax.get_xlim()),
            (ax.yaxis, ax.get_yscale(), ax.get_ylim()),
        ):
            if scale == "symlog":
                axis.set_major_formatter(plain)
            if scale != "log":
                continue
            low, high = sorted(limits)
            span = high / low if low > 0 else math.inf
            if span < 3:  # a narrow range: label every minor tick
                axis.set_minor_formatter(plain)
            elif span < 10:  # under a decade: label the minor ticks 2, 3 and 5 (x 10^k)
                axis.set_minor_formatter(
                    FuncFormatter(
                        lambda v, _: (
                            f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 3, 5) else ""
                        )
                    )
                )
            elif span < 1000:
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_minor_formatter(NullFormatter())
            else:
                axis.set_minor_formatter(NullFormatter())
            axis.set_major_formatter(plain)
            ax.tick_params(axis="x" if axis is ax.xaxis else "y", which="minor", labelsize=7)


def fig_per_t_loss(data: StudyResults, palette: dict):
    frame = data.final_probe()
    arms = _arms_with(frame, data.arms, "loss_mse")
    if not arms:
        return None
    ref_arms = _arms_with(frame, arms, "loss_best_ref")
    fig, axes = plt.subplots(1, 2 if ref_arms else 1, figsize=(FIG_WIDTH, 4.0), squeeze=False)
    ax = axes[0][0]
    _band(ax, frame, "t", "loss_mse", arms, palette, positive=True)
    for arm in ref_arms:  # the best reference depends on the schedule and data only: one line per arm
        rows = frame[frame["arm"] == arm].groupby("t")["loss_best_ref"].mean().sort_index()
        rows = rows[rows > 0]
        ax.plot(rows.index, rows.to_numpy(), color=palette[arm], ls="--", lw=1.1)
    if ref_arms:
        ax.plot(
            [], [], color="0.3", ls="--", lw=1.1, label="best reference: upper bound on the irreducible loss (dashed)"
        )
        # The best reference reaches ~1e-11 where the noise is far below a grey level; the
        # models' curves, not that, should fill the axis (it leaves it at the bottom edge).
        low = frame.loc[frame["loss_mse"] > 0, "loss_mse"].min()
        if np.isfinite(low):
            ax.set_ylim(bottom=low / 20)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="t (log scale)",
        ylabel="per-dimension MSE of predicted noise",
        title="Held-out noise-prediction loss per t (final probe)",
    )
    ax.legend(fontsize=8, ncol=2)
    if ref_arms:
        right = axes[0][1]
        for arm in ref_arms:  # mean over seeds
            rows = frame[frame["arm"] == arm].groupby("t")[["loss_mse", "loss_best_ref"]].mean().sort_index()
            gap = rows["loss_mse"] - rows["loss_best_ref"]
            # Clipped here only, for the log axis: the shortfall itself is signed (a model can
            # beat the best reference); the line breaks where it does.
            right.plot(rows.index, gap.where(gap > 0), color=palette[arm], lw=1.6, marker=".", ms=4, label=arm)
        right.set(
            xscale="log",
            yscale="log",
            xlabel="t (log scale)",
            ylabel="loss − best reference (where positive)",
            title="Shortfall: where the model is short of what the data allow",
        )
    fig.tight_layout()
    return fig


def fig_per_t_bias(data: StudyResults, palette: dict):
    frame = data.final_probe()
    arms = _arms_with(frame, data.arms, "eps_pred_mean")
    if not arms:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIG_WIDTH, 4.0), sharex=True)
    _band(left, frame, "t", "eps_pred_mean", arms, palette)
    left.axhline(0, color="0.3", ls="--", lw=1, label="ideal 0")
    left.set(
        xscale="log", xlabel="t (log scale)", ylabel="mean of predicted noise", title="Predicted-noise mean (ideal 0)"
    )
    if "eps_pred_std" in frame:
        _band(right, frame, "t", "eps_pred_std", arms, palette)
    right.axhline(1, color="0.3", ls="--", lw=1, label="ideal 1")
    right.set(
        xscale="log", xlabel="t (log scale)", ylabel="std of predicted noise", title="Predicted-noise std (ideal 1)"
    )
    left.legend(fontsize=8)
    return fig


def fig_vlb(data: StudyResults, palette: dict):
    frame = data.final_probe()
    quality = data.table("quality")
    vlb_arms = _arms_with(frame, data.arms, "vlb_bits")
    wt_arms = _arms_with(frame, data.arms, "wt")
    prior_arms = _arms_with(quality, data.arms, "prior_bits")
    if not (vlb_arms or wt_arms or prior_arms):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(FIG_WIDTH, 4.0), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    vlb_ax, wt_ax, prior_ax = axes
    if vlb_arms:
        _band(vlb_ax, frame, "t", "vlb_bits", vlb_arms, palette, positive=True)
        vlb_ax.legend(fontsize=7)
    vlb_ax.set(xscale="log", yscale="log", xlabel="t (log scale)", ylabel="bits/dim", title="VLB term per t (t=1: L_0)")
    if wt_arms:
        _band(wt_ax, frame, "t", "wt", wt_arms, palette, positive=True, label_seeds=False)
    wt_ax.set(xscale="log", yscale="log", xlabel="t (log scale)", ylabel="w_t", title="DDPM weight w_t (eq. 12)")
    if prior_arms:
        rows = quality[quality["prior_bits"].notna()]
        means = [rows.loc[rows["arm"] == a, "prior_bits"].mean() for a in prior_arms]
        positions = np.arange(len(prior_arms))
        prior_ax.bar(positions, means, color=[palette[a] for a in prior_arms], alpha=0.85)
        for i, arm in enumerate(prior_arms):
            seeds = rows.loc[rows["arm"] == arm, "prior_bits"]
            prior_ax.scatter(np.full(len(seeds), i), seeds, color="0.15", s=10, zorder=3)
            prior_ax.annotate(
                fmt(means[i]),
                (i, means[i]),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        prior_ax.set_xticks(positions, prior_arms, rotation=30, ha="right", fontsize=8)
        prior_ax.margins(y=0.25)
    prior_ax.set(ylabel="L_T (bits/dim)", title="Prior term L_T per arm")
    prior_ax.set_xlabel("large L_T: x_T is not N(0, I),\nthe chain never reaches noise", fontsize=8, color="0.25")
    fig.tight_layout()
    return fig


def fig_drift_curves(data: StudyResults, palette: dict):
    drift = data.table("drift")
    chosen = data.first_seed_keys("drift")
    if not chosen or "mean" not in drift:
        return None
    panels = [
        ("mean", "ref_mean", "mean of x_t"),
        ("std", "ref_std", "std of x_t"),
        ("frac_out", "ref_frac_out", "fraction of pixels outside [-1, 1]"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(FIG_WIDTH, 4.0), sharex=True)
    for ax, (col, ref, ylabel) in zip(axes, panels):
        for arm, (seed, key) in chosen.items():
            rows = drift[drift["run_key"] == key].sort_values("t")
            if col in rows:
                ax.plot(rows["t"], rows[col], color=palette[arm], lw=1.6, label=f"{arm} (seed {seed})")
            if ref in rows:
                ax.plot(rows["t"], rows[ref], color=palette[arm], lw=1.2, ls="--")
            for prefix, style in (("qstart", "-."), ("gauss_chain", ":")):
                other = f"{prefix}_{col}"
                if other in rows and rows[other].notna().any():
                    ax.plot(rows["t"], rows[other], color=palette[arm], lw=1.0, ls=style)
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlabel="t (symlog; sampling runs left to right)", ylabel=ylabel)
        ax.invert_xaxis()
    axes[0].set_title("x_t mean")
    axes[1].set_title("x_t std")
    axes[2].set_title("outside [-1, 1]")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", ls="--"))
    labels.append("reference q(x_t) (dashed)")
    if any(c.startswith("qstart_") for c in drift.columns):
        handles.append(plt.Line2D([], [], color="0.3", ls="-."))
        labels.append("the model's chain from q(x_T) of held-out images, same noise (dash-dot)")
    if any(c.startswith("gauss_chain_") for c in drift.columns):
        handles.append(plt.Line2D([], [], color="0.3", ls=":"))
        labels.append("reference curve: data's Gaussian denoiser, same x_T and noise (dotted)")
    axes[0].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


def fig_drift_hist(data: StudyResults, palette: dict):
    hist = data.table("drift_hist")
    chosen = data.first_seed_keys("drift_hist")
    if not chosen or "count" not in hist:
        return None
    arms = list(chosen)
    fig, axes = plt.subplots(len(arms), 2, figsize=(FIG_WIDTH, 1.0 + 2.1 * len(arms)), squeeze=False, sharex=True)
    grids = {}
    for arm in arms:
        rows = hist[hist["run_key"] == chosen[arm][1]]
        for column in ("count", "ref_count"):
            if column in rows:
                grid = rows.pivot_table(index="t", columns="bin_lo", values=column, aggfunc="sum").sort_index(
                    ascending=False
                )
                grids[arm, column] = (
                    grid,
                    grid.to_numpy(float) / np.maximum(grid.to_numpy(float).sum(axis=1, keepdims=True), 1),
                )
    vmax = max((float(np.nanmax(f)) for _, f in grids.values() if f.size), default=1.0) or 1.0
    images = []
    for row, arm in enumerate(arms):
        seed, key = chosen[arm]
        rows = hist[hist["run_key"] == key]
        for col, (column, what) in enumerate((("count", "sampled"), ("ref_count", "reference q(x_t)"))):
            ax = axes[row][col]
            if (arm, column) not in grids:
                ax.set_axis_off()
                continue
            grid, fractions = grids[arm, column]
            edges = np.append(grid.columns.to_numpy(float), rows["bin_hi"].max())
            image = ax.pcolormesh(
                edges,
                np.arange(len(grid.index) + 1),
                fractions,
                cmap="magma",
                norm=PowerNorm(0.4, vmin=0, vmax=vmax),
                shading="flat",
            )
            images.append(image)
            every = max(1, -(-len(grid.index) // 8))  # at most about 8 labelled rows
            ticks = np.arange(0, len(grid.index), every)
            ax.set_yticks(ticks + 0.5, [str(grid.index[i]) for i in ticks], fontsize=7)
            ax.invert_yaxis()
            ax.set_ylim(len(grid.index), 0)
            for edge in (-1, 1):
                ax.axvline(edge, color="white", ls=":", lw=0.8)
            ax.set_title(f"{arm}: {what} (seed {seed})", fontsize=9, color=palette[arm] if col == 0 else "0.2")
            ax.set_ylabel("t" if col == 0 else "")
            ax.grid(False)
    for ax in axes[-1]:
        ax.set_xlabel("pixel value")
    fig.tight_layout()
    if images:
        fig.colorbar(images[0], ax=axes, fraction=0.025, pad=0.01, label="fraction of pixels at t")
    return fig


def fig_training(data: StudyResults, palette: dict):
    train, probe = data.table("train"), data.table("probe")
    train_arms = _arms_with(train, data.arms, "loss")
    probe_arms = _arms_with(probe, data.arms, "heldout_loss")
    if not (train_arms or probe_arms):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIG_WIDTH, 4.0))
    if train_arms:
        _band(left, train, "step", "loss", train_arms, palette, positive=True)
        left.legend(fontsize=8)
    left.set(yscale="log", xlabel="training step", ylabel="loss", title="Training loss (mean since last log)")
    if probe_arms:
        _band(right, probe, "step", "heldout_loss", probe_arms, palette, positive=True)
        right.legend(fontsize=8)
    right.set(yscale="log", xlabel="training step", title="Held-out loss at each probe")
    return fig


@dataclass
class FigureSpec:
    name: str
    build: Callable
    alt: str
    caption: str
    empty: str


FIGURES: list[FigureSpec] = [
    FigureSpec(
        "per_t_loss",
        fig_per_t_loss,
        "per-t loss per arm",
        "Line: mean over seeds; band: min to max over seeds. Final probe of each run; t and loss on log scales. "
        "Dashed: the best reference, the lowest loss of four parameter-free reference denoisers fitted on the training "
        "split (per-pixel Bayes, Gaussian/Wiener, the training set's exact optimum, a 3x3 median filter) on the same "
        "images, noise and t: an upper bound on the irreducible loss (the Bayes-optimal denoiser can only do better). "
        "Right: the model's shortfall above the best reference, where it is demonstrably short of what the data allow "
        "(no line where the model beats it: the log axis cannot draw a negative shortfall).",
        "No per-t probe data: no arm has a finished run with a per_t table.",
    ),
    FigureSpec(
        "per_t_bias",
        fig_per_t_bias,
        "per-t predicted noise mean and std per arm",
        "A well-trained model predicts noise with mean 0 and std 1 (dashed reference lines) at every t. "
        "Line: mean over seeds; band: min to max over seeds; t on a log scale.",
        "No per-t probe data: no arm has a finished run with a per_t table.",
    ),
    FigureSpec(
        "vlb",
        fig_vlb,
        "VLB per t, w_t and prior L_T per arm",
        "Left: L_{t-1} in bits/dim (t=1 shows L_0; its discretized decoder has variance beta_tilde_2 when sigma = beta, as in the DDPM and Improved DDPM code), log scales. Middle: the DDPM weight w_t that L_simple drops. "
        "Right: the prior term L_T per arm (bar: mean over seeds, dots: seeds). "
        "A large L_T means the forward chain never reaches N(0, I): sampling starts from noise the model never saw.",
        "No VLB data: no arm has a finished run with per_t or quality rows.",
    ),
    FigureSpec(
        "drift_curves",
        fig_drift_curves,
        "sample drift along the reverse chain per arm",
        "Statistics of x_t while sampling from N(0, I) (solid) against q(x_t) from held-out data (dashed, same colour). "
        "Dash-dot: the model's own chain again, started from q(x_T | x_0) of the held-out images with the same noise: "
        "solid departing from dash-dot is the start's share of the drift, dash-dot departing from dashed the model's own. "
        "Dotted: a reference curve, the data's Gaussian (Wiener) denoiser through the same sampler from the same x_T and "
        "noise (not the model's share: the training set's exact optimum departs from it more than trained UNets do). "
        "First seed of each arm (the first with a finished run; seed in the legend). t on a symmetric-log axis (linear below 1, so the final sample t=0 shows), "
        "reversed so that sampling runs left to right. The gap between solid and dashed is the drift.",
        "No drift data: no arm has a finished run with a drift table.",
    ),
    FigureSpec(
        "drift_hist",
        fig_drift_hist,
        "pixel-value histograms over t, sampled vs reference, per arm",
        "Fraction of pixels in each value bin at each recorded t (rows, sampling runs top to bottom), "
        "sampled (left) and q(x_t) from held-out data (right); dotted lines at -1 and 1. First finished seed of each arm (seed in each title); "
        "colour on a power scale so that thin tails show.",
        "No drift histograms: no arm has a finished run with a drift_hist table.",
    ),
    FigureSpec(
        "training",
        fig_training,
        "training and held-out loss curves per arm",
        "Left: training loss logged during training. Right: held-out L_simple (uniform t) at each probe. "
        "Line: mean over seeds; band: min to max over seeds; log y.",
        "No training curves: no arm has a finished run with a train or probe table.",
    ),
]


def render_figure(spec: FigureSpec, data: StudyResults, palette: dict, out_dir: Path) -> dict:
    entry = {"name": spec.name, "alt": spec.alt, "caption": spec.caption, "src": None, "note": None}
    path = out_dir / f"{spec.name}.png"
    path.unlink(missing_ok=True)  # never leave a previous build's figure beside this page
    try:
        with sns.axes_style("whitegrid"):
            fig = spec.build(data, palette)
            if fig is None:
                entry["note"] = spec.empty
                return entry
            _readable_log_axes(*fig.axes)
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
        entry["src"] = path.name
    except Exception as exc:  # noqa: BLE001 - a broken figure must not break the page
        log.exception("figure %s failed", spec.name)
        entry["note"] = f"This figure could not be drawn ({type(exc).__name__}: {exc})."
    finally:
        plt.close("all")
    return entry
