"""The energy-meter interface: open a window, close it, get joules with their source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one window. Units: joules and seconds; ``source`` says who measured it."""

    joules: float
    seconds: float
    source: str  # "nvml", "rapl" or "estimate"
    device: str  # e.g. "cpu", "cuda:0"
    estimated: bool  # True for a model-based estimate rather than a hardware counter
    note: str | None = None  # e.g. "window shorter than counter period: power x time"

    @property
    def avg_watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


class EnergyMeter(ABC):
    """A device's energy source. ``begin`` returns an opaque mark; ``end`` closes the window."""

    source: str = "abstract"
    device: str = "cpu"

    @abstractmethod
    def begin(self) -> Any:
        """Mark the start of a window (cheap: no blocking device I/O beyond one counter read)."""

    @abstractmethod
    def end(self, mark: Any) -> EnergyReading:
        """Close the window opened by ``mark``."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the device (stop samplers, shut NVML down)."""
