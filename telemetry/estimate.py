"""A labelled estimate when no hardware counter is readable: CPU time × watts per busy core.

``joules = cpu_seconds × watts_per_core + wall_seconds × idle_watts``. The default of 10 W per
busy core is a mid-range server figure (a 2-core share of a ~100-150 W, 16-24-core package at
full load); CodeCarbon, when it cannot measure, takes the CPU's TDP from a table and assumes
50 % of it. Every reading from here is ``source="estimate"``, ``estimated=True``.
"""

from __future__ import annotations

import time

from telemetry.base import EnergyMeter, EnergyReading


class EstimateMeter(EnergyMeter):
    """Process CPU time (all threads, so onnxruntime's pool counts) over the window."""

    source = "estimate"

    def __init__(self, watts_per_core: float = 10.0, idle_watts: float = 0.0,
                 device: str = "cpu") -> None:
        if watts_per_core <= 0 or idle_watts < 0:
            raise ValueError("watts_per_core must be > 0 and idle_watts >= 0")
        self.watts_per_core = watts_per_core
        self.idle_watts = idle_watts
        self.device = device

    def begin(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def end(self, mark: tuple[float, float]) -> EnergyReading:
        wall0, cpu0 = mark
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        joules = cpu * self.watts_per_core + wall * self.idle_watts
        return EnergyReading(joules, wall, self.source, self.device, estimated=True,
                             note=f"estimate: {cpu:.3f} CPU-s x {self.watts_per_core:g} W/core")
