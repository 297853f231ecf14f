"""Training-step speed of the engine's `tiny` UNet vs diffusers' UNet2DModel, same process.

One step = forward + eps-MSE loss + backward + AdamW step, fp32, on random images. The two
models alternate round by round (and swap which goes first) so that thermal and background
drift hits both alike; each prints the median seconds per step over rounds, and the ratio
diffusers / ours (>= 1.0 means ours is at least as fast).

    python -m benchmarks.model_vs_diffusers [--batch 128] [--image-size 8] [--rounds 9]

Run by hand from the repository root; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm_engine.config import ModelConfig
from ddpm_engine.model import build_model, count_parameters

T = 1000


def diffusers_unet(channels: tuple[int, ...], image_channels: int, image_size: int, groups: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=image_channels,
        out_channels=image_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=groups,
        add_attention=False,  # the tiny preset has no attention anywhere
    )


class TrainStep:
    """Everything one step needs, allocated once so the timed loop only trains."""

    def __init__(self, model, predict, batch: int, image_channels: int, image_size: int):
        self.model, self.predict = model, predict
        # foreach: one fused op per moment update instead of ~100 small ones (CPU default
        # is the per-parameter loop); the same for both models.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        self.x0 = torch.rand(batch, image_channels, image_size, image_size) * 2 - 1
        betas = torch.linspace(1e-4, 0.02, T)
        self.alpha_bars = torch.cumprod(1 - betas, 0)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self) -> None:
        batch = self.x0.shape[0]
        t = torch.randint(1, T + 1, (batch,), generator=self.generator)
        eps = torch.randn(self.x0.shape, generator=self.generator)
        alpha_bar = self.alpha_bars[t - 1][:, None, None, None]
        xt = alpha_bar.sqrt() * self.x0 + (1 - alpha_bar).sqrt() * eps
        loss = F.mse_loss(self.predict(self.model, xt, t), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def seconds_per_step(step: TrainStep, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--image-channels", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--diffusers-channels",
        type=lambda s: tuple(int(c) for c in s.split(",")),
        default=(24, 48, 40),
        help="block_out_channels of the diffusers UNet, chosen to match tiny's size",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = build_model(ModelConfig(preset="tiny"), args.image_channels, args.image_size)
    theirs = diffusers_unet(
        args.diffusers_channels, args.image_channels, args.image_size, ModelConfig().norm_groups
    )
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    print(f"parameters: ours {n_ours:,}  diffusers {n_theirs:,}  ({n_theirs / n_ours:.2f}x)")
    if abs(n_theirs / n_ours - 1) > 0.10:
        print("warning: parameter counts differ by more than 10%")

    shape = (args.batch, args.image_channels, args.image_size, args.image_size)
    steps = {
        "ours": TrainStep(ours, lambda m, x, t: m(x, t), *shape[:2], args.image_size),
        # diffusers counts timesteps from 0.
        "diffusers": TrainStep(
            theirs, lambda m, x, t: m(x, t - 1).sample, *shape[:2], args.image_size
        ),
    }
    for step in steps.values():  # warm-up: allocator, oneDNN primitive caches, AdamW state
        seconds_per_step(step, 5)

    timings: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            timings[name].append(seconds_per_step(steps[name], args.steps_per_round))

    medians = {name: statistics.median(values) for name, values in timings.items()}
    bests = {name: min(values) for name, values in timings.items()}
    for name, value in medians.items():
        spread = f"{bests[name]:.4f}..{max(timings[name]):.4f}"
        print(f"{name:>9}: {value:.4f} s/step (median of {args.rounds} rounds, range {spread})")
    # The best round is the least disturbed by other processes on a shared machine.
    print(
        f"ratio diffusers / ours: {medians['diffusers'] / medians['ours']:.2f} (medians), "
        f"{bests['diffusers'] / bests['ours']:.2f} (best rounds)"
    )


if __name__ == "__main__":
    main()
