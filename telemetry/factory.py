"""Choose the best energy meter this host allows, best first; absence of hardware is normal.

``auto`` tries NVML then the estimate for a GPU lane, RAPL then the estimate for a CPU lane
(NVML measures a GPU, not the CPU doing the work). Naming a meter tries it first and still
falls back to the estimate rather than refusing to start; each fallback is one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from telemetry.base import EnergyMeter, MeterUnavailableError
from telemetry.estimate import EstimateMeter
from telemetry.nvml import NvmlMeter, nvml_target
from telemetry.rapl import DEFAULT_ROOT, RaplMeter

log = logging.getLogger(__name__)

MeterKind = Literal["auto", "nvml", "rapl", "estimate"]


@dataclass(frozen=True)
class MeterConfig:
    """What the factory needs, taken from the service settings."""

    kind: MeterKind = "auto"
    device: str = "cpu"  # the lane's device: "cpu" or "cuda"
    gpu_index: int | None = None
    cuda_visible_devices: str | None = None
    nvml_sample_hz: float = 10.0
    nvml_counter_period_s: float = 0.1
    rapl_root: Path = DEFAULT_ROOT
    watts_per_core: float = 10.0
    idle_watts: float = 0.0


def preference(kind: MeterKind, device: str) -> list[str]:
    """The order in which meters are tried."""
    if kind == "auto":
        return ["nvml", "estimate"] if device == "cuda" else ["rapl", "estimate"]
    return [kind] if kind == "estimate" else [kind, "estimate"]


def create_meter(cfg: MeterConfig) -> EnergyMeter:
    """The first meter in :func:`preference` order that works here."""
    makers: dict[str, Callable[[], EnergyMeter]] = {
        "nvml": lambda: NvmlMeter(nvml_target(cfg.gpu_index, cfg.cuda_visible_devices),
                                  sample_hz=cfg.nvml_sample_hz,
                                  counter_period_s=cfg.nvml_counter_period_s),
        "rapl": lambda: RaplMeter(cfg.rapl_root),
        "estimate": lambda: EstimateMeter(cfg.watts_per_core, cfg.idle_watts, cfg.device),
    }
    order = preference(cfg.kind, cfg.device)
    for i, name in enumerate(order):
        try:
            meter = makers[name]()
        except MeterUnavailableError as err:
            log.warning("energy meter %s unavailable: %s; trying %s", name, err, order[i + 1])
            continue
        log.info("energy meter: %s", meter.describe())
        return meter
    raise AssertionError("unreachable: the estimate meter always works")
