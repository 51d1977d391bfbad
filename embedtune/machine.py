"""What machine is this? CPU model, the instruction-set flags that decide bf16 speed, and measured peaks.

This project's CPUs differ by 2x and more: Intel with AMX runs bf16 matmuls 2-3x faster than fp32;
AMD EPYC with ``avx512_bf16`` (no AMX) about 2x; a CPU with AVX2 only has no native bf16 matmul at all,
and bf16 there is *two orders of magnitude* slower than fp32. Benchmarks print :func:`describe` so that
numbers from two machines are never mixed, and the demo plans its run from what it measures here.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache

# Flags worth naming (Linux /proc/cpuinfo spelling).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
NAMED_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, flags) from ``/proc/cpuinfo``; (``platform.processor()``, empty) elsewhere."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure_matmul_gflops(dtype_name: str = "float32", *, budget_s: float = 1.5, size: int = 1024) -> float:
    """Measured matmul throughput (GFLOP/s) at torch's current thread count.

    Times ``size`` x ``size`` products for about ``budget_s`` and keeps the best; bf16 on a CPU
    without bf16 instructions uses 256 x 256 so that the slow emulated kernel costs little.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    # Without native kernels (bf16 on a CPU with neither AMX nor AVX-512 BF16: ~1 GFLOP/s) stay small:
    # the answer is already clear. Decided from the flags, not a timing a busy machine could fool.
    n = 256 if dtype == torch.bfloat16 and not any(f in cpu_info()[1] for f in BF16_FLAGS) else size
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: kernel selection, allocations
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best / 1e9


@dataclass(frozen=True)
class MachineInfo:
    """The facts a benchmark row needs to be comparable."""

    cpu_model: str
    flags: tuple[str, ...]  # the NAMED_FLAGS present
    cores: int
    threads: int
    torch_version: str
    peak_fp32_gflops: float | None = None
    peak_bf16_gflops: float | None = None

    @property
    def native_bf16(self) -> bool:
        """True when the CPU has bf16 matmul instructions (AMX or AVX-512 BF16)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def tag(self) -> str:
        """A short file-name-safe name for the kind of machine, e.g. ``amd-epyc_avx2``."""
        model = self.cpu_model.lower()
        vendor = (
            "intel"
            if "intel" in model
            else "amd-epyc"
            if "epyc" in model
            else "amd"
            if "amd" in model
            else "cpu"
        )
        isa = (
            "amx"
            if "amx_bf16" in self.flags
            else "avx512bf16"
            if "avx512_bf16" in self.flags
            else ("avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags else "basic")
        )
        return f"{vendor}_{isa}_{self.threads}t"

    def describe(self) -> str:
        """Header lines: CPU, flags, threads, measured peaks."""
        flags = ", ".join(f"{f}={'yes' if f in self.flags else 'no'}" for f in NAMED_FLAGS)
        load = ""
        if hasattr(os, "getloadavg"):
            load = f"; load average {os.getloadavg()[0]:.1f}"
        lines = [
            f"machine: {self.cpu_model}; {self.cores} usable cores{load}; torch {self.torch_version}, "
            f"{self.threads} threads",
            f"flags: {flags}",
        ]
        if self.peak_fp32_gflops is not None:
            bf16 = f"{self.peak_bf16_gflops:.1f}" if self.peak_bf16_gflops is not None else "not measured"
            lines.append(
                f"measured matmul peak ({self.threads} threads): fp32 {self.peak_fp32_gflops:.1f} GFLOP/s, "
                f"bf16 {bf16} GFLOP/s"
                + ("" if self.native_bf16 else "  (no native bf16: bf16 compute is emulated)")
            )
        return "\n".join(lines)


def machine_info(*, measure: bool = True, budget_s: float = 1.5) -> MachineInfo:
    """Describe this machine; with ``measure``, time fp32 and bf16 matmuls (about ``2 * budget_s``)."""
    import torch

    model, flags = cpu_info()
    fp32 = bf16 = None
    if measure:
        fp32 = measure_matmul_gflops("float32", budget_s=budget_s)
        bf16 = measure_matmul_gflops("bfloat16", budget_s=budget_s)
    return MachineInfo(
        cpu_model=model,
        flags=tuple(f for f in NAMED_FLAGS if f in flags),
        cores=usable_cores(),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        peak_fp32_gflops=fp32,
        peak_bf16_gflops=bf16,
    )
