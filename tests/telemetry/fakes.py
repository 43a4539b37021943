"""Fakes at the hardware boundary: a pynvml stand-in and a powercap sysfs tree in a temp dir."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

from telemetry.base import EnergyMeter  # noqa: E402 (after the warning filter)


class FakeNvml:
    """The pynvml calls greenroute makes, answering with numbers a test sets.

    ``energy_mj`` is the total-energy counter (``None``: the GPU lacks it, NotSupported);
    ``power_mw`` the power reading; ``fail_init``/``fail_reads`` raise NVML errors.
    """

    API = ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByIndex",
           "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetName",
           "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage")
    NVMLError = pynvml.NVMLError

    def __init__(self, energy_mj: int | None = 1_000_000, power_mw: int = 250_000) -> None:
        self.energy_mj = energy_mj
        self.power_mw = power_mw
        self.fail_init = False
        self.fail_reads = False
        self.handles: list[int | str] = []
        self.inits = 0
        self.shutdowns = 0
        self.lock = threading.Lock()

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.fail_init:
            raise pynvml.NVMLError_DriverNotLoaded()
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:  # noqa: N802
        self.handles.append(index)
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:  # noqa: N802
        self.handles.append(uuid)
        return ("handle", uuid)

    def nvmlDeviceGetName(self, handle: Any) -> str:  # noqa: N802
        return "Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:  # noqa: N802
        if self.energy_mj is None:
            raise pynvml.NVMLError_NotSupported()
        if self.fail_reads:
            raise pynvml.NVMLError_GpuIsLost()
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:  # noqa: N802
        if self.fail_reads:
            raise pynvml.NVMLError_GpuIsLost()
        return self.power_mw


def make_powercap(root: Path, packages: dict[int, int], dram: dict[int, int] | None = None,
                  max_uj: int = 262_143_328_850) -> Path:
    """A powercap tree like the kernel's: ``intel-rapl:N`` packages with ``core`` (and optionally
    ``dram``) sub-zones, plus the ``intel-rapl-mmio`` mirror that must not be counted."""
    for pkg, uj in packages.items():
        zone = root / f"intel-rapl:{pkg}"
        write_zone(zone, f"package-{pkg}", uj, max_uj)
        write_zone(root / f"intel-rapl:{pkg}:0", "core", uj // 2, max_uj)
        write_zone(root / f"intel-rapl-mmio:{pkg}", f"package-{pkg}", uj, max_uj)
        if dram and pkg in dram:
            write_zone(root / f"intel-rapl:{pkg}:1", "dram", dram[pkg], max_uj)
    return root


def write_zone(zone: Path, name: str, energy_uj: int, max_uj: int) -> None:
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def set_energy(root: Path, zone: str, energy_uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{energy_uj}\n")


class CounterMeter(EnergyMeter):
    """A device energy counter a test moves by hand (``total``, joules)."""

    def __init__(self, source: str = "fake") -> None:
        super().__init__()
        self.source = source
        self.total = 0.0

    def total_joules(self) -> float:
        return self.total
