"""Where a run executes and in which precision."""

from __future__ import annotations

import resource
import sys
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


def autocast_factory(device: torch.device, precision: str) -> Callable[[], ContextManager] | None:
    """A zero-argument factory of the autocast context for ``precision``, or None for fp32.

    bf16 autocast measured 1.4-1.6x faster on the larger models on a 2-core AVX-512 CPU
    (DESIGN.md sec. 8), so it is offered on CPU as well as CUDA.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


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

