"""The estimate meter, the token split for shared runs, carbon, and the device sampler."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from telemetry.attribution import split_by_tokens
from telemetry.carbon import grams_co2e
from telemetry.estimate import EstimateMeter
from telemetry.factory import preference
from telemetry.metrics import Metrics
from telemetry.sampler import DeviceSampler
from tests.telemetry.fakes import CounterMeter


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_busy_window_costs_more_than_an_idle_one_of_the_same_length() -> None:
    meter = EstimateMeter(watts_per_core=10.0)
    mark = meter.begin()
    _spin(0.2)
    busy = meter.end(mark)
    mark = meter.begin()
    time.sleep(busy.seconds)
    idle = meter.end(mark)
    assert busy.joules > 5 * idle.joules
    assert busy.joules == pytest.approx(10.0 * 0.2, rel=0.3)
    assert busy.source == "estimate" and busy.estimated and "CPU-s" in (busy.note or "")


def test_idle_share_adds_wall_time_watts() -> None:
    meter = EstimateMeter(watts_per_core=10.0, idle_watts=50.0)
    mark = meter.begin()
    time.sleep(0.1)
    reading = meter.end(mark)
    assert reading.joules >= 50.0 * 0.1 * 0.95 and "idle" in (reading.note or "")


@pytest.mark.parametrize("bad", [{"watts_per_core": 0.0}, {"idle_watts": -1.0}])
def test_estimate_refuses_unsafe_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EstimateMeter(**bad)


@pytest.mark.parametrize(("joules", "tokens", "want"), [
    (9.0, {"a": 1, "b": 2}, {"a": 3.0, "b": 6.0}),
    (4.0, {"a": 0, "b": 0}, {"a": 2.0, "b": 2.0}),
    (5.0, {"a": 7}, {"a": 5.0}),
    (5.0, {}, {}),
    (0.0, {"a": 3, "b": 1}, {"a": 0.0, "b": 0.0}),
])
def test_shared_window_is_split_by_tokens(joules: float, tokens: dict[str, int],
                                          want: dict[str, float]) -> None:
    got = split_by_tokens(joules, tokens)
    assert got == pytest.approx(want)
    assert sum(got.values()) == pytest.approx(joules if tokens else 0.0)


def test_split_refuses_negative_inputs() -> None:
    with pytest.raises(ValueError):
        split_by_tokens(-1.0, {"a": 1})
    with pytest.raises(ValueError):
        split_by_tokens(1.0, {"a": -1})


def test_carbon_from_joules_and_grid_intensity() -> None:
    assert grams_co2e(3.6e6, 400.0) == pytest.approx(400.0)  # 1 kWh at 400 g/kWh
    assert grams_co2e(36.0, 250.0) == pytest.approx(0.0025)
    assert grams_co2e(10.0, None) is None


@pytest.mark.parametrize(("kind", "device", "want"), [
    ("auto", "cpu", ["rapl", "estimate"]),
    ("auto", "cuda", ["nvml", "estimate"]),
    ("nvml", "cpu", ["nvml", "estimate"]),
    ("estimate", "cuda", ["estimate"]),
])
def test_meter_preference(kind: str, device: str, want: list[str]) -> None:
    assert preference(kind, device) == want  # type: ignore[arg-type]


def test_device_sampler_feeds_power_and_energy_metrics() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["full"], ["cpu"])
    metrics.meter_opened("cpu", "rapl")
    labels = {"device": "cpu", "source": "rapl"}
    assert registry.get_sample_value("greenroute_device_energy_joules_total", labels) == 0.0
    meter = CounterMeter("rapl")
    seen = threading.Event()

    def on_sample(watts: float, joules: float) -> None:
        metrics.device_sample("cpu", "rapl", watts, joules)
        seen.set()

    sampler = DeviceSampler(meter, on_sample, period_s=3600)  # samples only when asked here
    try:
        time.sleep(0.1)
        meter.total = 12.0
        sampler.sample()
        assert seen.is_set()
        watts = registry.get_sample_value("greenroute_device_power_watts", labels)
        assert watts is not None and 12.0 / 0.5 < watts < 12.0 / 0.1 * 1.01
        meter.total = 15.0
        sampler.sample()
        assert registry.get_sample_value("greenroute_device_energy_joules_total",
                                         labels) == pytest.approx(15.0)
    finally:
        sampler.stop()
