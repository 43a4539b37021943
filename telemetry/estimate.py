"""A labelled estimate when no hardware counter is readable: CPU time × watts per busy core.

``joules = cpu_seconds × watts_per_core + wall_seconds × idle_watts``. The default of 10 W per
busy core is a mid-range server figure (a 2-core share of a ~100-150 W, 16-24-core package at
full load); CodeCarbon, when it cannot measure, takes the CPU's TDP from a table and assumes
50 % of it. Every reading from here is ``source="estimate"``, ``estimated=True``.
"""

from __future__ import annotations

import time

from telemetry.base import EnergyMeter


class EstimateMeter(EnergyMeter):
    """Process CPU time (all threads, so onnxruntime's pool counts) over the window."""

    source = "estimate"
    estimated = True

    def __init__(self, watts_per_core: float = 10.0, idle_watts: float = 0.0,
                 device: str = "cpu") -> None:
        super().__init__()
        if watts_per_core <= 0 or idle_watts < 0:
            raise ValueError("watts_per_core must be > 0 and idle_watts >= 0")
        self.watts_per_core = watts_per_core
        self.idle_watts = idle_watts
        self.device = device
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def total_joules(self) -> float:
        cpu_s = time.process_time() - self._cpu0
        wall_s = time.perf_counter() - self._wall0
        return cpu_s * self.watts_per_core + wall_s * self.idle_watts

    def note(self, joules: float, seconds: float) -> str:
        cpu_s = max(0.0, joules - seconds * self.idle_watts) / self.watts_per_core
        return f"estimate: {cpu_s:.3f} CPU-s x {self.watts_per_core:g} W/core" + (
            f" + {seconds:.3f} s x {self.idle_watts:g} W idle" if self.idle_watts else "")

    def describe(self) -> str:
        return (f"estimate on {self.device} ({self.watts_per_core:g} W per busy core, "
                f"{self.idle_watts:g} W idle; not a measurement)")
