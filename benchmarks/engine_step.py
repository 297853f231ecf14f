"""Training-step throughput: ddpm_engine against diffusers, side by side in one process.

Ours is the engine's real step (`Trainer.train_step`: batch and t sampling, q_sample, the
objective, backward, grad clipping, AdamW, EMA). Theirs is the same work done the
diffusers way: `UNet2DModel` at a matched parameter count, `DDPMScheduler.add_noise`,
eps-MSE, grad clipping, AdamW (foreach) and diffusers' `EMAModel`. The two alternate round
by round (swapping who goes first) so background load hits both; we print images/s of
each and the ratio ours / diffusers (target >= 1.0, goal 1.3 with bf16 where it converges).

    python -m benchmarks.engine_step                       # tiny, 1x8x8, batch 128, fp32
    python -m benchmarks.engine_step --precision bf16
    python -m benchmarks.engine_step --preset annotated --image-size 16 --batch 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

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


def engine_step(preset: str, channels: int, size: int, batch: int, precision: str):
    config = ExperimentConfig.from_dict(
        {"model": {"preset": preset}, "train": {"batch_size": batch, "precision": precision}}
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


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(DIFFUSERS_CHANNELS), default="tiny")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument(
        "--diffusers-precision",
        choices=["fp32", "bf16", "auto"],
        default=None,
        help="defaults to --precision (matched); fp32 compares our bf16 with their fp32",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.preset, args.channels, args.image_size, args.batch)
    steps = {
        "ddpm_engine": engine_step(*shape, args.precision),
        "diffusers": diffusers_step(*shape, args.diffusers_precision or args.precision),
    }
    (_, n_ours), (_, n_theirs) = steps["ddpm_engine"], steps["diffusers"]
    print(
        f"parameters: ddpm_engine {n_ours:,}  diffusers {n_theirs:,} ({n_theirs / n_ours:.2f}x); "
        f"{args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, {args.threads} threads"
    )
    for step, _ in steps.values():  # warm-up: allocator, oneDNN caches, optimizer state
        seconds_per_step(step, 3)
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            timings[name].append(seconds_per_step(steps[name][0], args.steps_per_round))
    median = {name: statistics.median(v) for name, v in timings.items()}
    for name, value in median.items():
        print(
            f"{name:>12}: {value:.4f} s/step  {args.batch / value:7.0f} images/s  "
            f"(median of {args.rounds} rounds, range {min(timings[name]):.4f}..{max(timings[name]):.4f})"
        )
    print(f"ratio ddpm_engine / diffusers images/s: {median['diffusers'] / median['ddpm_engine']:.2f}")


if __name__ == "__main__":
    main()
