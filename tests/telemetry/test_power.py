"""The power cap's signal: the device's live power over a window, from the meter."""

from __future__ import annotations

import pytest

from telemetry.base import EnergyMeter
from telemetry.power import LivePower


class Counter(EnergyMeter):
    """The hardware boundary: an energy counter the test moves."""

    source = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.joules = 0.0

    def total_joules(self) -> float:
        return self.joules


def test_power_counts_a_running_request_from_its_first_step() -> None:
    """A long generation draws 50 W for 3 s and has not ended: the live power says so within
    the window, where the joules of finished requests would still say 0."""
    meter = Counter()
    power = LivePower(meter, window_s=5.0)
    power.observe(0.0, now=100.0)
    for t in range(1, 4):  # the sampler's readings every second while it runs
        meter.joules = 50.0 * t
        power.observe(meter.joules, now=100.0 + t)
    meter.joules = 175.0
    assert power.watts(now=103.5) == pytest.approx(50.0)


def test_the_window_forgets_old_power() -> None:
    meter = Counter()
    power = LivePower(meter, window_s=2.0)
    power.observe(0.0, now=0.0)
    meter.joules = 300.0  # 100 W for 3 s ...
    power.observe(300.0, now=3.0)
    power.observe(300.0, now=4.0)  # ... then idle
    assert power.watts(now=6.0) == pytest.approx(0.0)  # the last 2 s drew nothing
    meter.joules = 310.0
    assert power.watts(now=7.0) == pytest.approx(10.0 / 3.0)  # 4.0 .. 7.0: the oldest kept


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LivePower(Counter(), window_s=0)
