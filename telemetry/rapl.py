"""RAPL through the Linux powercap tree: ``/sys/class/powercap/<zone>/energy_uj``.

Counted zones: every package (``intel-rapl:N``; AMD packages appear under the same driver
name, or ``amd-rapl:N`` on some kernels) and each package's ``dram`` sub-zone where present.
Core/uncore sub-zones are inside their package's figure and are not added again; the
``intel-rapl-mmio`` mirror of the package counter is skipped for the same reason.
Counters are µJ and wrap at ``max_energy_range_uj``: each read folds the delta since the
previous read into a running total, so wrap-around is handled as long as reads come at least
once per wrap period (minutes at full power; the device sampler reads every second).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from telemetry.base import EnergyMeter, MeterUnavailableError

DEFAULT_ROOT = Path("/sys/class/powercap")
_PACKAGE = re.compile(r"^(intel|amd)-rapl:\d+$")
_SUBZONE = re.compile(r"^(intel|amd)-rapl:\d+:\d+$")


@dataclass
class _Zone:
    name: str
    fd: int  # energy_uj, kept open: a window costs two pread calls, not two opens
    max_uj: int
    last_uj: int


def open_counter(path: Path) -> int:
    """Open a counter file for repeated reads (the sysfs boundary tests fake)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        _pread_int(fd)
        return fd
    except PermissionError as err:
        raise MeterUnavailableError(f"RAPL: permission denied reading {path} (needs root or "
                                    "a readable energy_uj)") from err
    except (OSError, ValueError) as err:
        raise MeterUnavailableError(f"RAPL: cannot read {path}: {err}") from err


def _pread_int(fd: int) -> int:
    return int(os.pread(fd, 64, 0).strip())


def discover_zones(root: Path) -> list[tuple[str, Path]]:
    """``(label, zone dir)`` for each package and dram zone under ``root``."""
    if not root.is_dir():
        raise MeterUnavailableError(f"RAPL: {root} does not exist (no powercap driver, or a VM)")
    zones = []
    for path in sorted(root.iterdir()):
        kind = None
        if _PACKAGE.match(path.name):
            kind = "package"
        elif _SUBZONE.match(path.name):
            name_file = path / "name"
            if name_file.exists() and name_file.read_text().strip() == "dram":
                kind = "dram"
        if kind is not None:
            zones.append((f"{path.name}({kind})", path))
    if not zones:
        raise MeterUnavailableError(f"RAPL: no package zones under {root}")
    return zones


class RaplMeter(EnergyMeter):
    """Package (+ dram) energy of the whole CPU: a hardware reading, not per process."""

    source = "rapl"

    def __init__(self, root: Path = DEFAULT_ROOT, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self._zones: list[_Zone] = []
        try:
            for label, path in discover_zones(root):
                max_fd = open_counter(path / "max_energy_range_uj")
                max_uj = _pread_int(max_fd)
                os.close(max_fd)
                fd = open_counter(path / "energy_uj")
                self._zones.append(_Zone(label, fd, max_uj, _pread_int(fd)))
        except MeterUnavailableError:
            self.close()
            raise
        self._total_uj = 0

    def total_joules(self) -> float:
        with self._lock:
            for zone in self._zones:
                now = _pread_int(zone.fd)
                delta = now - zone.last_uj
                if delta < 0:  # the counter wrapped past max_energy_range_uj
                    delta += zone.max_uj
                self._total_uj += delta
                zone.last_uj = now
            return self._total_uj / 1e6

    def describe(self) -> str:
        return f"rapl on {self.device} ({', '.join(z.name for z in self._zones)})"

    def close(self) -> None:
        for zone in self._zones:
            os.close(zone.fd)
        self._zones = []
