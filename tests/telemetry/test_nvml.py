"""NVML meter against a fake pynvml patched where greenroute imports it."""

from __future__ import annotations

import logging
import time

import pytest

from telemetry import nvml
from telemetry.base import MeterUnavailableError
from telemetry.factory import MeterConfig, create_meter
from telemetry.nvml import NvmlMeter, nvml_target
from tests.telemetry.fakes import FakeNvml, pynvml


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    f = FakeNvml()
    monkeypatch.setattr(nvml, "pynvml", f)
    return f


def test_the_fake_only_uses_real_pynvml_calls() -> None:
    for name in FakeNvml.API:
        assert callable(getattr(pynvml, name)), name


def test_counter_gpu_reports_the_counters_joules(fake: FakeNvml) -> None:
    meter = NvmlMeter(0, counter_period_s=0.0)
    assert meter.mode == "counter" and meter.device == "cuda:0"
    mark = meter.begin()
    fake.energy_mj += 5_000  # 5 J spent on the GPU during the window
    reading = meter.end(mark)
    assert reading.joules == pytest.approx(5.0)
    assert reading.source == "nvml" and reading.estimated is False and reading.note is None
    assert reading.avg_watts == pytest.approx(5.0 / reading.seconds)
    fake.energy_mj += 2_500
    assert meter.total_joules() == pytest.approx(7.5)


def test_window_shorter_than_counter_period_uses_power_times_duration(fake: FakeNvml) -> None:
    meter = NvmlMeter(0, counter_period_s=10.0)  # every window here is "short"
    fake.power_mw = 300_000
    mark = meter.begin()
    time.sleep(0.02)
    reading = meter.end(mark)  # the counter did not move
    assert reading.joules == pytest.approx(300.0 * reading.seconds)
    assert reading.joules > 0 and "shorter than the energy counter" in (reading.note or "")


def test_counter_that_did_not_move_is_not_a_silent_zero(fake: FakeNvml) -> None:
    meter = NvmlMeter(0, counter_period_s=0.0)
    fake.power_mw = 120_000
    mark = meter.begin()
    time.sleep(0.01)
    reading = meter.end(mark)
    assert reading.joules == pytest.approx(120.0 * reading.seconds) and reading.joules > 0


def test_gpu_without_counter_integrates_power_samples(fake: FakeNvml) -> None:
    fake.energy_mj = None  # pre-Volta: NotSupported
    fake.power_mw = 100_000
    meter = NvmlMeter(0, sample_hz=200)
    try:
        assert meter.mode == "sampling"
        mark = meter.begin()
        time.sleep(0.25)
        reading = meter.end(mark)
        assert reading.joules == pytest.approx(100.0 * reading.seconds, rel=0.05)
        assert "power samples" in (reading.note or "")
        fake.power_mw = 200_000  # power doubles: the next window shows it
        time.sleep(0.05)
        mark = meter.begin()
        time.sleep(0.25)
        reading = meter.end(mark)
        assert reading.avg_watts == pytest.approx(200.0, rel=0.1)
    finally:
        meter.close()
    assert fake.shutdowns == 1


def test_init_failure_is_unavailable_and_the_factory_falls_back(
        fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    fake.fail_init = True
    with pytest.raises(MeterUnavailableError, match="NVML: init failed"):
        NvmlMeter(0)
    with caplog.at_level(logging.WARNING, logger="telemetry.factory"):
        meter = create_meter(MeterConfig(kind="auto", device="cuda"))
    assert meter.source == "estimate"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nvml unavailable" in warnings[0].getMessage()


def test_auto_on_a_gpu_lane_picks_nvml(fake: FakeNvml) -> None:
    meter = create_meter(MeterConfig(kind="auto", device="cuda", cuda_visible_devices="3,1"))
    assert meter.source == "nvml" and meter.device == "cuda:3" and fake.handles == [3]
    meter.close()


def test_failed_reads_keep_the_last_figure(fake: FakeNvml) -> None:
    meter = NvmlMeter(0, counter_period_s=0.0)
    fake.energy_mj += 4_000
    assert meter.total_joules() == pytest.approx(4.0)
    fake.fail_reads = True
    assert meter.total_joules() == pytest.approx(4.0)  # no exception, no drop to zero
    fake.fail_reads = False
    fake.energy_mj += 1_000
    assert meter.total_joules() == pytest.approx(5.0)


@pytest.mark.parametrize(("index", "visible", "want"), [
    (None, None, 0),
    (None, "", 0),
    (None, "2,0", 2),
    (None, "GPU-8f3a-uuid,1", "GPU-8f3a-uuid"),
    (1, "2,0", 1),
])
def test_gpu_choice_follows_setting_then_cuda_visible_devices(
        index: int | None, visible: str | None, want: int | str) -> None:
    assert nvml_target(index, visible) == want


def test_uuid_target_opens_by_uuid(fake: FakeNvml) -> None:
    meter = NvmlMeter("GPU-8f3a-uuid")
    assert fake.handles == ["GPU-8f3a-uuid"] and meter.device == "cuda:GPU-8f3a-uuid"
    meter.close()
