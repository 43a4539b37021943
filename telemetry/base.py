"""The energy-meter interface: a cumulative device counter, and windows over it.

Every meter exposes one thing, :meth:`EnergyMeter.total_joules` — the device's energy since the
meter opened, idle included, monotonic — and windows (``begin``/``end``) are differences of it.
Units are joules and seconds from here on; vendor units (mJ, µJ, mW) are converted inside the
vendor's file, once.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass


class MeterUnavailableError(Exception):
    """This meter cannot measure here (no library, no device, no permission): try the next."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one window. Units: joules and seconds; ``source`` says who measured it."""

    joules: float
    seconds: float
    source: str  # "nvml", "rapl" or "estimate"
    device: str  # e.g. "cpu", "cuda:0"
    estimated: bool  # True for a model-based estimate rather than a hardware counter
    note: str | None = None  # e.g. "window shorter than counter period: power x time"
    prefill_joules: float | None = None  # a request's share: the part its prompt's forwards
    # took (None where the window has no such split: a meter's own readings)

    @property
    def avg_watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0

    @property
    def generation_joules(self) -> float:
        """The rest of a request's share: its generated tokens' steps (all of it where the
        reading has no prefill part)."""
        return self.joules - (self.prefill_joules or 0.0)


@dataclass(frozen=True)
class Mark:
    """The start of a window: wall clock (``perf_counter`` seconds) and the meter's total."""

    wall_s: float
    joules: float


class EnergyMeter(ABC):
    """A device's energy source. Thread-safe: the lane and the device sampler both read it."""

    source: str = "abstract"
    device: str = "cpu"
    estimated: bool = False

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def total_joules(self) -> float:
        """Device energy since the meter opened, idle included (J, never decreasing)."""

    def begin(self) -> Mark:
        """Mark the start of a window (one counter read, no blocking device I/O beyond it)."""
        return Mark(time.perf_counter(), self.total_joules())

    def end(self, mark: Mark) -> EnergyReading:
        """Close the window opened by ``mark``."""
        joules = self.total_joules() - mark.joules
        seconds = time.perf_counter() - mark.wall_s
        return EnergyReading(max(joules, 0.0), seconds, self.source, self.device,
                             self.estimated, self.note(joules, seconds))

    def note(self, joules: float, seconds: float) -> str | None:
        """How a window's number came about, when that is worth saying."""
        return None

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"{self.source} on {self.device}"

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the device (stop samplers, shut NVML down)."""
