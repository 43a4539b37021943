"""What this host's CPU is: its model name and the instruction sets that decide which kernels
onnxruntime (and greenroute's own) run. Every benchmark table and the manifest record these."""

from __future__ import annotations

import functools
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


def isa_flags() -> list[str]:
    """Those of :data:`ISA_FLAGS` this CPU has (empty off x86 or without /proc/cpuinfo)."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in have]


def isa_summary() -> str:
    """One line for a table's caption or a test header: ``NAME (avx2 fma ...)``."""
    return f"{cpu_name()} ({' '.join(isa_flags()) or 'no x86 SIMD flags read'})"
