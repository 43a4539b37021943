"""bench gpu-check end to end on the tiny ladder, against a fake pynvml module in both the
service's process and the checker's (the hardware boundary), on the CPU: every part runs, the
table prints, and a failed check fails the command."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from bench.gpu_check import report, run_check
from telemetry import nvml

FAKE = Path(__file__).parent / "fake_nvml"


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(nvml, "pynvml", module)  # this process's meters
    monkeypatch.setenv("FAKE_NVML_T0", str(time.time()))
    monkeypatch.setenv("FAKE_NVML_WATTS", "150")
    # the stand-in's counter moves continuously: tell the service so (a real GPU's moves every
    # 20-100 ms, the default 0.1 s, and its requests take far longer than the tiny model's)
    monkeypatch.setenv("GREENROUTE_NVML_COUNTER_PERIOD_S", "0")
    # the service's process imports the stand-in first
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH",
                                                                                 "")]))


def test_gpu_check_runs_every_part_against_the_fake_nvml(tiny_ladder: Path, tmp_path: Path,
                                                         fake_gpu: None) -> None:
    f = run_check(tiny_ladder, tmp_path / "unused", device="cpu", threads=1, requests=6,
                  agreement_runs=2)
    assert f["build_s"] == 0.0 and f["ladder"] == str(tiny_ladder)  # a built ladder is reused
    assert f["meter"]["source"] == "nvml" and f["gpu"].startswith("Fake GPU")
    # both meters read one fake device drawing 150 W: they agree
    assert f["agreement"]["median_ratio"] == pytest.approx(1.0, abs=0.05)
    assert [s["clients"] for s in f["scaling"]] == [1, 4, 16]
    assert all(s["sources"] == ["nvml"] and s["tokens_per_s"] > 0 for s in f["scaling"])
    assert f["answers_over_busy"] == pytest.approx(1.0, abs=0.05)  # the ledger conserves
    assert set(f["routing"]) == {1, 8}
    assert all(r["routed_over_full"] is not None for r in f["routing"].values())
    # every check passes but the time limit's, which is the bench's to report (no test asserts
    # on wall-clock time)
    assert all(ok for name, ok in f["checks"].items() if not name.startswith("under")), f
    text = report(f)
    assert "NVML counter vs 100 Hz samples" in text and "full, 16 clients" in text
    assert "routing, 8 clients" in text and "ok  every rung served on cpu" in text


def test_a_rung_not_on_the_asked_device_fails_the_check(tiny_ladder: Path, tmp_path: Path,
                                                        fake_gpu: None) -> None:
    """Asked for CUDA on a host without it, onnxruntime falls back to the CPU: the check reads
    where each rung's sessions really run and fails instead of passing."""
    f = run_check(tiny_ladder, tmp_path, device="cuda", threads=1, requests=2, agreement_runs=1)
    assert f["served_on"] == ["cpu"]
    assert not f["checks"]["every rung served on cuda"] and not f["ok"]
    assert "FAILED every rung served on cuda" in report(f)
