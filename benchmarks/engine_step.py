"""Training-step throughput: ddpm_engine against diffusers, side by side in one process.

Ours is the engine's real step (`Trainer.train_step`: batch and t sampling, q_sample, the
objective, backward, grad clipping, AdamW, EMA). Theirs is the same work done the
diffusers way: `UNet2DModel` at a matched parameter count, `DDPMScheduler.add_noise`,
eps-MSE, grad clipping, AdamW (foreach) and diffusers' `EMAModel`. The two alternate round
by round (swapping who goes first) so background load hits both; we print images/s of
each and the ratio ours / diffusers (target >= 1.0, goal 1.3 with bf16 where it converges).

Per image size it also prints the FLOPs of one step's forward and backward (torch's
FlopCounterMode: convolutions and matmuls, what dominates a UNet) and the rate each
contestant achieves, against the machine's measured fp32 matmul peak at the same threads:
how far the step is from what the CPU can do, not only from diffusers.

    python -m benchmarks.engine_step                       # tiny, 1x{8,16,28}^2, batch 128, fp32
    python -m benchmarks.engine_step --image-sizes 16 --threads 1 --compile
    python -m benchmarks.engine_step --precision bf16
    python -m benchmarks.engine_step --preset annotated --image-sizes 16 --batch 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm_engine import ExperimentConfig
from ddpm_engine.device import autocast_factory
from ddpm_engine.model import build_model, count_parameters
from ddpm_engine.schedule import make_schedule
from ddpm_engine.training import Trainer

# block_out_channels of a diffusers UNet2DModel near each preset's size at 1 channel
DIFFUSERS_CHANNELS = {"tiny": (24, 48, 40), "annotated": (112, 224, 448)}


def diffusers_step(preset: str, channels: int, size: int, batch: int, precision: str):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    blocks = DIFFUSERS_CHANNELS[preset]
    attention = preset == "annotated"
    model = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=blocks,
        layers_per_block=1 if preset == "tiny" else 2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * (len(blocks) - 1)
        + (("AttnDownBlock2D",) if attention else ("DownBlock2D",)),
        up_block_types=(("AttnUpBlock2D",) if attention else ("UpBlock2D",)) + ("UpBlock2D",) * (len(blocks) - 1),
        add_attention=attention,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ema = EMAModel(model.parameters(), decay=0.999, foreach=True)
    images = torch.rand(1024, channels, size, size) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    autocast = autocast_factory(torch.device("cpu"), precision)

    def step() -> None:
        x0 = images[torch.randint(0, len(images), (batch,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        if autocast is not None:
            with autocast():
                pred = model(noisy, t).sample.float()
        else:
            pred = model(noisy, t).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())

    return step, count_parameters(model)


def engine_step(preset: str, channels: int, size: int, batch: int, precision: str, compile: bool = False):
    config = ExperimentConfig.from_dict(
        {"model": {"preset": preset}, "train": {"batch_size": batch, "precision": precision, "compile": compile}}
    )
    model = build_model(config.model, channels, size)
    images = torch.rand(1024, channels, size, size) * 2 - 1
    device = torch.device("cpu")
    trainer = Trainer(
        config, model, make_schedule(config.diffusion), images, 256, device, autocast_factory(device, precision)
    )

    def step() -> None:
        trainer.train_step()
        if len(trainer.unlogged) >= 25:  # as the experiment loop does every log_every steps
            trainer.flush_window(0.0)

    return step, count_parameters(model)


def step_flops(step) -> int:
    """FLOPs of one call of ``step`` as torch counts them (forward and backward of the model;
    the optimizer's elementwise work is not counted and is small beside the convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate at ``threads`` (FLOP/s, best of ``repeats``): the ceiling
    a convolution lowered to GEMM can approach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def compare(args, size: int, peak: float) -> None:
    """One image size: both contestants (and the compiled engine with --compile) alternating."""
    torch.manual_seed(0)
    shape = (args.preset, args.channels, size, args.batch)
    steps = {
        "ddpm_engine": engine_step(*shape, args.precision),
        "diffusers": diffusers_step(*shape, args.diffusers_precision or args.precision),
    }
    if args.compile:
        steps["ddpm_engine+compile"] = engine_step(*shape, args.precision, compile=True)
    (_, n_ours), (_, n_theirs) = steps["ddpm_engine"], steps["diffusers"]
    print(
        f"\n{args.channels}x{size}x{size}, batch {args.batch}, {args.threads} thread(s); parameters: "
        f"ddpm_engine {n_ours:,}  diffusers {n_theirs:,} ({n_theirs / n_ours:.2f}x)"
    )
    for step, _ in steps.values():  # warm-up: allocator, oneDNN caches, optimizer state, compile
        seconds_per_step(step, 3)
    flops = {name: step_flops(step) for name, (step, _) in steps.items()}
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            timings[name].append(seconds_per_step(steps[name][0], args.steps_per_round))
    median = {name: statistics.median(v) for name, v in timings.items()}
    for name, value in median.items():
        rate = flops[name] / value
        print(
            f"{name:>20}: {value * 1000:7.1f} ms/step {args.batch / value:7.0f} images/s "
            f"{flops[name] / 1e9:6.1f} GFLOP/step {rate / 1e9:6.1f} GFLOP/s ({rate / peak:4.0%} of matmul peak) "
            f"[median of {args.rounds} rounds, {min(timings[name]) * 1000:.1f}..{max(timings[name]) * 1000:.1f} ms]"
        )
    print(f"ratio ddpm_engine / diffusers images/s: {median['diffusers'] / median['ddpm_engine']:.2f}")
    if args.compile:
        print(f"ratio compiled / eager ddpm_engine: {median['ddpm_engine'] / median['ddpm_engine+compile']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(DIFFUSERS_CHANNELS), default="tiny")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[8, 16, 28])
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument(
        "--diffusers-precision",
        choices=["fp32", "bf16", "auto"],
        default=None,
        help="defaults to --precision (matched); fp32 compares our bf16 with their fp32",
    )
    parser.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: a CPU slot of `harness run` has 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    print(f"fp32 matmul peak at {args.threads} thread(s): {peak / 1e9:.0f} GFLOP/s (2048x2048, best of 5)")
    for size in args.image_sizes:
        compare(args, size, peak)


if __name__ == "__main__":
    main()
