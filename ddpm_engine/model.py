"""UNet that predicts the noise eps added to x_0, conditioned on the diffusion timestep t.

Layout (annotated-diffusion style): ``conv_in`` -> down levels -> middle -> up levels ->
``GroupNorm, SiLU, conv_out``. Each entry of ``channel_mults`` is one resolution level with
``num_res_blocks`` residual blocks; every down block leaves a skip tensor that the matching
up block concatenates. Levels are joined by a stride-2 3x3 conv (down) and nearest x2 +
3x3 conv (up), which also change the width between levels. Feature maps are channels_last
inside; the output is an ordinary contiguous tensor.

Odd sides: a stride-2 conv with padding 1 maps a side n to ceil(n / 2), and each upsample
resizes to the exact side of the skip it is about to meet, so 28 -> 14 -> 7 -> 4 -> 2 and
back works without padding or cropping. Only a level whose input is already 1x1 cannot be
halved; that raises ``ValueError`` at construction.

Attention placement is decided once at construction from ``image_size``: a level gets
self-attention when its feature-map side is in ``attention_resolutions``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_engine.config import ModelConfig
from ddpm_engine.shapes import feature_map_sides


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm needs groups | channels. Channel counts differ per level (base * mult), so
    # one `norm_groups` rarely divides all of them in a custom config; rather than refusing
    # the config we take the closest smaller group count, which keeps the normalisation as
    # fine-grained as the user asked for wherever it can be.
    return nn.GroupNorm(largest_divisor_at_most(channels, groups), channels)


class SinusoidalTimeEmbedding(nn.Module):
    """The Transformer/DDPM position encoding of a (float) timestep."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        half = max(dim // 2, 1)
        self.dim = 2 * half
        # Geometric frequencies from 1 down to 1/max_period, so both the step-to-step
        # differences and the position within the whole 1..T range are visible.
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("frequencies", max_period ** (-exponents), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep added after the first conv.

    ``time_projection`` maps whatever time features the UNet hands over to one offset per
    channel: a Linear from the shared MLP's output, or a whole MLP of its own from the
    sinusoidal embedding (``time_mlp: per_block``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_projection: nn.Module,
        norm_groups: int,
        dropout: float,
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = time_projection
        self.norm2 = group_norm(out_channels, norm_groups)
        # nn.Dropout(0) still dispatches an op per call in training; skip it entirely.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, time_features: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_projection(time_features)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.shortcut(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int, norm_groups: int):
        super().__init__()
        # Heads must split the channels evenly; like GroupNorm, fall back to the nearest
        # smaller head count so one `attention_heads` works at every level's width.
        self.heads = largest_divisor_at_most(channels, heads)
        self.norm = group_norm(channels, norm_groups)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.to_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.heads
        # Token-major [B, HW, 3, heads, head_dim] is exactly the memory order of a
        # channels_last feature map, so both permutes below are free views there.
        qkv = self.to_qkv(self.norm(x)).permute(0, 2, 3, 1)
        qkv = qkv.reshape(b, h * w, 3, self.heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, HW, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.to_out(attended)


class Downsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # Learned stride-2 conv; padding 1 gives ceil(n / 2), so odd sides shrink cleanly.
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, side: tuple[int, int]) -> Tensor:
        # Resize to the skip's exact side (2x, or 2x - 1 after an odd side was halved).
        return self.conv(F.interpolate(x, size=side, mode="nearest"))


class Stage(nn.Module):
    """The residual blocks of one level, each optionally followed by self-attention."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class UNet(nn.Module):
    def __init__(self, config: ModelConfig, image_channels: int, image_size: int):
        super().__init__()
        base = config.base_channels
        widths = [base * mult for mult in config.channel_mults]
        sides = feature_map_sides(image_size, config.channel_mults)
        attention_sides = set(config.attention_resolutions)
        groups, heads = config.norm_groups, config.attention_heads
        time_dim = config.time_embed_dim

        # Sinusoid width follows the first level's width, as in DDPM (ch) and the annotated
        # UNet (dim); `time_embed_dim` is the width of the MLP that reads it.
        self.sinusoid = SinusoidalTimeEmbedding(base)
        self.shared_time_mlp: nn.Module | None = None
        if config.time_mlp == "shared":
            self.shared_time_mlp = nn.Sequential(
                nn.Linear(self.sinusoid.dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            )

        def time_projection(channels: int) -> nn.Module:
            if self.shared_time_mlp is not None:
                return nn.Linear(time_dim, channels)
            return nn.Sequential(nn.Linear(self.sinusoid.dim, time_dim), nn.SiLU(), nn.Linear(time_dim, channels))

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, time_projection(c_out), groups, config.dropout)

        def attention_or_identity(channels: int, side: int) -> nn.Module:
            if side in attention_sides:
                return SelfAttention(channels, heads, groups)
            return nn.Identity()

        self.conv_in = nn.Conv2d(image_channels, widths[0], 3, padding=1)

        # The level transitions change the width (as in the annotated UNet): the stride-2
        # conv widens into the next level and the upsampling conv narrows back. So every
        # residual block of a down level is width -> width (no 1x1 shortcut), and the
        # upsampling conv, which runs at the larger side, works at the smaller width.
        self.down_stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, (width, side) in enumerate(zip(widths, sides)):
            blocks = [res_block(width, width) for _ in range(config.num_res_blocks)]
            attentions = [attention_or_identity(width, side) for _ in blocks]
            self.down_stages.append(Stage(blocks, attentions))
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(width, widths[level + 1]))

        self.mid_block1 = res_block(widths[-1], widths[-1])
        self.mid_attention = attention_or_identity(widths[-1], sides[-1])
        self.mid_block2 = res_block(widths[-1], widths[-1])

        self.up_stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, side = widths[level], sides[level]
            # Input: this level's width plus the skip (same width) it concatenates.
            blocks = [res_block(2 * width, width) for _ in range(config.num_res_blocks)]
            attentions = [attention_or_identity(width, side) for _ in blocks]
            self.up_stages.append(Stage(blocks, attentions))
            if level > 0:
                self.upsamples.append(Upsample(width, widths[level - 1]))

        channels = widths[0]
        self.norm_out = group_norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, image_channels, 3, padding=1)
        # Zero output at initialisation: the untrained net predicts eps_hat = 0, so the
        # first loss is E[eps^2] = 1 whatever scale the random body happens to produce,
        # instead of early steps spent (and gradients spiked) undoing a random output
        # field. The body still learns from the second step on, once conv_out is non-zero.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

        self.level_sides = tuple(sides)
        self.image_size = image_size
        # channels_last (NHWC) throughout: oneDNN's convolutions run 10-17% faster per
        # training step at these widths (24-channel NCHW convs fall off a fast path), it
        # was never slower on the annotated preset, and it is attention's token order.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """eps prediction for x_t [B, C, H, W] at 1-based timesteps t [B] (or one scalar t)."""
        if t.dim() == 0:  # samplers step the whole batch at one t
            t = t.expand(x.shape[0])
        time_features = self.sinusoid(t)
        if self.shared_time_mlp is not None:
            # Computed once per forward; the SiLU belongs to every block's projection input.
            time_features = F.silu(self.shared_time_mlp(time_features))

        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        skips = []
        for level, stage in enumerate(self.down_stages):
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(h, time_features))
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)

        h = self.mid_block1(h, time_features)
        h = self.mid_attention(h)
        h = self.mid_block2(h, time_features)

        for level, stage in enumerate(self.up_stages):
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(torch.cat((h, skips.pop()), dim=1), time_features))
            if level < len(self.upsamples):
                h = self.upsamples[level](h, skips[-1].shape[-2:])

        # Callers get an ordinary contiguous tensor (a free view when there is one channel).
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


def build_model(config: ModelConfig, image_channels: int, image_size: int) -> UNet:
    return UNet(config, image_channels, image_size)
