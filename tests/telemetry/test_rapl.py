"""RAPL meter on a fake powercap tree in a temp dir."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from telemetry import rapl
from telemetry.base import MeterUnavailableError
from telemetry.factory import MeterConfig, create_meter
from telemetry.rapl import RaplMeter
from tests.telemetry.fakes import make_powercap, set_energy


def test_reads_packages_and_dram_but_not_subzones_or_mmio(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, {0: 10_000_000, 1: 20_000_000}, dram={0: 5_000_000})
    meter = RaplMeter(root)
    mark = meter.begin()
    set_energy(root, "intel-rapl:0", 13_000_000)  # +3 J package 0
    set_energy(root, "intel-rapl:1", 21_500_000)  # +1.5 J package 1
    set_energy(root, "intel-rapl:0:1", 5_500_000)  # +0.5 J dram
    set_energy(root, "intel-rapl:0:0", 9_000_000)  # core: inside the package's figure
    set_energy(root, "intel-rapl-mmio:0", 99_000_000)  # the package's mirror
    reading = meter.end(mark)
    assert reading.joules == pytest.approx(5.0)
    assert reading.source == "rapl" and reading.device == "cpu" and not reading.estimated


def test_wrap_around_uses_max_energy_range(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, {0: 999_000_000}, max_uj=1_000_000_000)
    meter = RaplMeter(root)
    mark = meter.begin()
    set_energy(root, "intel-rapl:0", 2_000_000)  # wrapped: 1 J to the top, then 2 J
    assert meter.end(mark).joules == pytest.approx(3.0)
    set_energy(root, "intel-rapl:0", 4_000_000)
    assert meter.total_joules() == pytest.approx(5.0)


def test_permission_denied_is_unavailable_and_falls_back_to_estimate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    root = make_powercap(tmp_path, {0: 1_000})
    real_open = rapl.os.open

    def open_(path: Path, flags: int) -> int:
        if Path(path).name == "energy_uj":  # as where only root may read it (CVE-2020-8694)
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags)

    monkeypatch.setattr(rapl.os, "open", open_)
    with pytest.raises(MeterUnavailableError, match="permission denied"):
        RaplMeter(root)
    with caplog.at_level(logging.WARNING, logger="telemetry.factory"):
        meter = create_meter(MeterConfig(kind="rapl", rapl_root=root))
    assert meter.source == "estimate"
    assert sum("rapl unavailable" in r.getMessage() for r in caplog.records) == 1


def test_absent_powercap_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailableError, match="does not exist"):
        RaplMeter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeterUnavailableError, match="no package zones"):
        RaplMeter(tmp_path / "empty")


def test_auto_on_a_cpu_lane_prefers_rapl(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, {0: 1_000})
    assert create_meter(MeterConfig(kind="auto", device="cpu", rapl_root=root)).source == "rapl"
    missing = tmp_path / "none"
    assert create_meter(MeterConfig(kind="auto", rapl_root=missing)).source == "estimate"
