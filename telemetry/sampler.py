"""A device sampler: reads the meter's running total every ``period_s`` in its own thread, so
``device_power_watts`` and ``device_energy_joules_total`` stay current (idle included) and a
scrape of ``/metrics`` reads only cached values."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from telemetry.base import EnergyMeter

log = logging.getLogger(__name__)


class DeviceSampler:
    """Calls ``on_sample(watts, joules_since_last)`` once per period until :meth:`stop`."""

    def __init__(self, meter: EnergyMeter, on_sample: Callable[[float, float], None],
                 period_s: float = 1.0) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be > 0")
        self.meter = meter
        self.period_s = period_s
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the thread and a scrape both sample
        self._last_j = meter.total_joules()
        self._last_t = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="device-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take one sample now (the thread calls this every period, and a scrape of
        ``/metrics`` too, so the energy counter is current at every scrape)."""
        with self._lock:
            total = self.meter.total_joules()
            now = time.perf_counter()
            delta_j = max(0.0, total - self._last_j)
            dt = now - self._last_t
            self._last_j, self._last_t = total, now
            self._on_sample(delta_j / dt if dt > 0 else 0.0, delta_j)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except Exception:  # a bad read must not end the sampler
                log.exception("device energy sample failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.period_s + 1)
