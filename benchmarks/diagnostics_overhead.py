"""What the engine's own diagnostics cost: per-t probes and drift recording, at default settings.

One run of the default config (tiny UNet, digits, default eval settings) gives the probe time
(the training phase's wall time minus its optimizer steps). Drift recording is an observer on
the sampler, so its cost is sampling with the DriftRecorder minus sampling without it, the two
alternated round by round on the same model, shape and noise. Both are quoted as a share of
the run's wall time.

    python -m benchmarks.diagnostics_overhead [--steps 2000] [--rounds 3]

Target (docs/design.md, "Targets"): probes and drift recording at most 10% of a run's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddpm_engine import ExperimentConfig, NullRecorder, run_experiment
from ddpm_engine.data import load_data
from ddpm_engine.diagnostics import DriftRecorder
from ddpm_engine.model import build_model
from ddpm_engine.sampling import sample
from ddpm_engine.schedule import make_schedule


def timed_sampling(config: ExperimentConfig, with_drift: bool) -> float:
    data = load_data(config.data)
    schedule = make_schedule(config.diffusion)
    torch.manual_seed(0)
    model = build_model(config.model, data.channels, data.image_size).eval()
    shape = (config.sample.num_samples, data.channels, data.image_size, data.image_size)
    observer = None
    if with_drift:
        x0 = data.to_model_space(data.heldout)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        observer = DriftRecorder(
            schedule, x0, noise, bins=config.eval.drift_bins, hist_steps=config.eval.drift_hist_steps
        )
    start = time.perf_counter()
    sample(
        model,
        schedule,
        shape,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        observer=observer,
    )
    if observer is not None:
        observer.tables()  # the host copies belong to the recorder's cost
    return time.perf_counter() - start


def timed_split(config: ExperimentConfig) -> tuple[float, float, float]:
    """Seconds of the three chains of sample_with_drift on an untrained model (the cost does
    not depend on the weights): the sampled chain, the model's chain from q(x_T | x_0) of the
    held-out images (the drift split's extra chain) and the Gaussian-denoiser reference chain."""
    from ddpm_engine.experiment import build, chain_drift, gauss_chain_drift, heldout_start, run_sampler

    parts = build(config, torch.device("cpu"))
    seconds = []
    for run in (
        lambda: run_sampler(parts, parts.denoiser, parts.autocast, None),
        lambda: chain_drift(parts, parts.denoiser, parts.autocast, "qstart", start_x0=heldout_start(parts)),
        lambda: gauss_chain_drift(parts),
    ):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], seconds[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = ExperimentConfig.from_dict({"train": {"steps": args.steps}})

    summary = run_experiment(config, NullRecorder(), device="cpu").summary
    seconds = summary["seconds"]
    probe = summary["train_seconds"] - summary["train_loop_seconds"]
    probes = args.steps // config.eval.probe_every + (args.steps % config.eval.probe_every > 0)
    print(
        f"default run ({args.steps} steps): {seconds:.1f} s wall; optimizer steps {summary['train_loop_seconds']:.1f} s, "
        f"sampling {summary['sample_seconds']:.1f} s"
    )
    print(
        f"per-t probes ({probes} probes of {config.eval.probe_timesteps} timesteps): "
        f"{probe:.1f} s = {probe / seconds:.1%} of the run"
    )

    plain, drift = [], []
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for with_drift in order:
            (drift if with_drift else plain).append(timed_sampling(config, with_drift))
        print(f"round {r}: sampling {plain[-1]:.2f} s, with drift recording {drift[-1]:.2f} s", flush=True)
    extra = statistics.median(drift) - statistics.median(plain)
    print(
        f"drift recording: +{extra:.2f} s per run (median sampling {statistics.median(plain):.2f} -> "
        f"{statistics.median(drift):.2f} s) = {extra / seconds:.1%} of the run"
    )
    print(f"probes + drift recording: {(probe + extra) / seconds:.1%} of the run's wall time (target <= 10%)")
    plain_s, qstart_s, gauss_s = timed_split(config)
    print(
        f"drift split: sampled chain {plain_s:.2f} s, + chain from q(x_T) {qstart_s:.2f} s "
        f"(+{qstart_s / plain_s:.0%} of sampling, {qstart_s / seconds:.1%} of the run), "
        f"+ Gaussian reference chain {gauss_s:.2f} s"
    )


if __name__ == "__main__":
    main()
