"""The device's live power: the signal the power cap acts on.

Read from the energy meter itself, over the last ``window_s`` seconds, whenever the cap is
checked (the device sampler adds a reading every period between checks). It moves while
requests run: a long generation counts from its first step, not at its end (an earlier window
summed the joules of requests that had *ended*, so the cap reacted late and then all at once).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from telemetry.base import EnergyMeter


class LivePower:
    """Average watts over the latest ``window_s`` seconds of meter readings."""

    def __init__(self, meter: EnergyMeter, window_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.meter = meter
        self.window_s = window_s
        self._readings: deque[tuple[float, float]] = deque()  # (perf_counter s, total J)
        self._lock = threading.Lock()

    def observe(self, total_joules: float, now: float | None = None) -> None:
        """A reading of the meter's total (the sampler calls this every period)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            self._readings.append((now, total_joules))
            # keep one reading at or before the window's start: the span stays ~window_s
            while len(self._readings) > 2 and self._readings[1][0] <= now - self.window_s:
                self._readings.popleft()

    def watts(self, now: float | None = None) -> float:
        """The device's average power over about the last ``window_s`` seconds, reading the
        meter now."""
        self.observe(self.meter.total_joules(), now)
        with self._lock:
            (t0, j0), (t1, j1) = self._readings[0], self._readings[-1]
        return max(0.0, j1 - j0) / (t1 - t0) if t1 > t0 else 0.0
