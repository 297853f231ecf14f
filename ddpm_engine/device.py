"""Where a run executes and in which precision."""

from __future__ import annotations

import functools
import platform
import resource
import subprocess
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


# bf16 autocast on a CPU pays only with bf16 arithmetic in hardware, and only for a model big
# enough to keep it busy. Measured on an Intel Xeon with AVX-512 and AMX (2 cores; the founding
# card, sec. 8): the annotated UNet (47M parameters, 16x16, batch 32) trained 1.67x faster under
# bf16 autocast (0.66 against 1.10 s/step), the tiny one (0.5M, 8x8, batch 128) gained nothing
# (0.042 against 0.038 s/step). The crossover between the two was not measured: the threshold sits
# at their geometric middle, so `auto` keeps tiny in fp32 and gives annotated bf16.
BF16_CPU_MIN_PARAMS = 5_000_000
# CPU flags of bf16 arithmetic in hardware. x86: AVX512_BF16 (Cooper Lake, Sapphire Rapids, AMD
# Zen 4) or AMX-BF16 (Sapphire Rapids on); AVX-512 alone (Skylake-X, Ice Lake) only converts, so
# oneDNN emulates bf16 there and it is no faster than fp32. ARM: FEAT_BF16 (`bf16` in Features:
# Graviton3, Neoverse V1/N2, Apple M2 on). torch's capability string cannot tell: it says AVX512
# on any AVX-512 CPU and DEFAULT or SVE256 on ARM, with or without bf16.
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_MACHINES = ("aarch64", "arm64")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in the text of /proc/cpuinfo: its ``flags`` lines on x86, its
    ``Features`` lines on ARM."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return flags


def cpu_native_bf16(flags: set[str], machine: str) -> bool:
    """Whether a CPU with these feature ``flags`` (``cpu_flags``) and ``platform.machine()``
    does bf16 arithmetic in hardware."""
    if machine.lower() in ARM_MACHINES:
        return "bf16" in flags
    return bool(X86_BF16_FLAGS & flags)


@functools.lru_cache(maxsize=1)
def _this_cpu_flags() -> frozenset[str]:
    """This machine's CPU flags: /proc/cpuinfo on Linux, sysctl on macOS, and what torch's
    cpuinfo library says of AVX512_BF16 and AMX (any OS)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            flags |= cpu_flags(file.read())
    except OSError:
        pass
    if sys.platform == "darwin" and platform.machine().lower() in ARM_MACHINES:
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip() == "1":
                flags.add("bf16")
        except (OSError, subprocess.SubprocessError):
            pass
    # every CPU with AMX tiles so far also has AMX-BF16 (Sapphire Rapids and later)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, probe in probes.items():  # private torch helpers: used when present
        try:
            if getattr(torch.cpu, probe)():
                flags.add(flag)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(flags)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run in hardware here. A CPU without (this AMD
    EPYC, AVX2 only) falls back to reference kernels: the tiny UNet trained 4-5x slower under
    bf16 autocast than in fp32 on such a 2-core machine."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_native_bf16(set(_this_cpu_flags()), platform.machine())
    return False


def auto_precision(device_type: str, native: bool, params: int | None) -> str:
    """What ``auto`` means: bf16 on a GPU with bf16; on a CPU with bf16 in hardware only for a
    model of at least BF16_CPU_MIN_PARAMS parameters (an unknown size stays fp32); else fp32."""
    if not native:
        return "fp32"
    if device_type == "cuda":
        return "bf16"
    if device_type == "cpu" and params is not None and params >= BF16_CPU_MIN_PARAMS:
        return "bf16"
    return "fp32"


def resolve_precision(device: torch.device, precision: str, params: int | None = None) -> str:
    """The precision a run of a model with ``params`` parameters uses: ``auto`` as
    ``auto_precision`` says (docs/design.md, "Precision"); ``fp32`` or ``bf16`` as given, with a
    warning when bf16 is forced on a CPU that only emulates it."""
    if precision == "auto":
        return auto_precision(device.type, native_bf16(device), params)
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


def autocast_factory(
    device: torch.device, precision: str, params: int | None = None
) -> Callable[[], ContextManager] | None:
    """A zero-argument factory of the autocast context for ``precision`` (after
    ``resolve_precision`` for a model of ``params`` parameters), or None for fp32."""
    if resolve_precision(device, precision, params) == "fp32":
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
