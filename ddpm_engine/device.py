"""Where a run executes and in which precision."""

from __future__ import annotations

import resource
import sys
import warnings
from typing import Callable, ContextManager

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else MPS, else CPU; anything else is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run in hardware here. A CPU without AVX-512
    (torch reports AVX2) falls back to reference kernels: the tiny UNet trained 4-5x slower
    under bf16 autocast than in fp32 on such a 2-core machine."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` is bf16 autocast on a GPU that supports it and fp32 elsewhere: on CPU bf16
    helped only the larger models on an AVX-512 machine (docs/design.md, "Targets"; the founding card sec. 8), so there it is a
    choice the user makes, not a default."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn(
            f"train.precision=bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
            "autocast falls back to slow reference kernels; fp32 is faster here",
            RuntimeWarning,
            stacklevel=2,
        )
    return precision


def autocast_factory(device: torch.device, precision: str) -> Callable[[], ContextManager] | None:
    """A zero-argument factory of the autocast context for ``precision`` (after
    ``resolve_precision``), or None for fp32."""
    if resolve_precision(device, precision) == "fp32":
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def sample_chunk_size(device: torch.device, image_pixels: int) -> int:
    """Samples per forward pass: large on accelerators, modest on CPU (cache-friendly)."""
    budget = 2**22 if device.type == "cuda" else 2**16  # input pixels per forward pass
    return max(1, budget // max(image_pixels, 1))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: CUDA allocator peak, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
