"""What this host's CPU is: its model name and the instruction sets that decide which kernels
onnxruntime (and greenroute's own) run. Every benchmark table and the manifest record these."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags (as /proc/cpuinfo spells them) that change integer GEMM kernels: AVX2 alone has no
# 8-bit dot product that cannot saturate; the VNNI ones do; AMX has tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The host CPU's model name (calibrations from another CPU are re-measured at start-up)."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


# kernels/avx2only.c (loaded with LD_PRELOAD) hides every extension above AVX2 + FMA from CPUID
# and says so in this variable; code in this process then runs its AVX2 paths.
AVX2_ONLY = ("avx2", "fma")


def cpuid_masked() -> bool:
    """Whether kernels/avx2only hides this CPU's extensions above AVX2 from this process."""
    return (os.environ.get("GREENROUTE_CPUID_MASK") == "avx2"
            and "avx2only" in os.environ.get("LD_PRELOAD", ""))


def _proc_flags() -> list[str]:
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in have]


def isa_flags() -> list[str]:
    """Those of :data:`ISA_FLAGS` code in this process sees (empty off x86 or without
    /proc/cpuinfo): the CPU's, less those a CPUID mask hides."""
    flags = _proc_flags()
    return [f for f in flags if f in AVX2_ONLY] if cpuid_masked() else flags


def isa_summary() -> str:
    """One line for a table's caption or a test header: ``NAME (avx2 fma ...)``, naming the
    flags a CPUID mask hides."""
    seen = " ".join(isa_flags()) or "no x86 SIMD flags read"
    hidden = [f for f in _proc_flags() if f not in isa_flags()]
    if hidden:
        seen += f"; {' '.join(hidden)} hidden by the avx2only CPUID mask"
    return f"{cpu_name()} ({seen})"
