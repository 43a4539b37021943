"""Energy telemetry through the real app: labelled readings, carbon, exemplars, device series."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.telemetry.fakes import make_powercap, set_energy


def sample(client: TestClient, name: str, **labels: str) -> float | None:
    """One sample from the Prometheus text of ``/metrics`` (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", re.M)
    found = pattern.search(client.get("/metrics").text)
    return float(found.group(1)) if found else None


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_estimate_reading_is_labelled_and_carbon_is_reported(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(energy_meter="estimate", grid_gco2_per_kwh=400.0)
    body = client.post("/v1/generate", json={"prompt": "The json module", "max_new_tokens": 4,
                                             "variant": "full"}).json()
    energy = body["energy"]
    assert energy["source"] == "estimate" and energy["estimated"] is True
    assert "CPU-s" in energy["note"] and energy["device"] == "cpu"
    meter = client.get("/v1/variants").json()["energy_meter"]
    assert meter["source"] == "estimate" and meter["estimated"] is True
    assert "not a measurement" in meter["description"]
    assert energy["gco2e"] == pytest.approx(energy["joules"] / 3.6e6 * 400.0)
    assert energy["joules_per_token"] == pytest.approx(
        energy["joules"] / body["usage"]["completion_tokens"])
    usage = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["usage"]
    assert usage["gco2e"] == pytest.approx(usage["energy_joules"] / 3.6e6 * 400.0)


def test_no_carbon_figure_without_grid_intensity(client: TestClient) -> None:
    energy = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()["energy"]
    assert energy["gco2e"] is None


def test_request_histograms_carry_request_id_exemplars_in_openmetrics(
        client: TestClient) -> None:
    request_id = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2,
                                                   "variant": "distilled"}).json()["id"]
    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    exemplar_lines = [line for line in om.text.splitlines() if f'request_id="{request_id}"' in line]
    names = {line.split("{")[0] for line in exemplar_lines}
    assert {"greenroute_request_energy_joules_bucket", "greenroute_request_power_watts_bucket",
            "greenroute_request_duration_seconds_bucket"} <= names
    assert request_id not in client.get("/metrics").text  # never a label, not in plain text


def test_device_series_track_all_energy_including_idle(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(energy_meter="estimate", estimate_idle_watts=20.0,
                         device_sample_period_s=0.05)
    labels = {"device": "cpu", "source": "estimate"}
    first = sample(client, "greenroute_device_energy_joules_total", **labels)
    assert first is not None
    # idle: no request runs, yet 20 W of idle share keeps accumulating
    assert wait_for(lambda: (sample(client, "greenroute_device_energy_joules_total", **labels)
                             or 0.0) >= first + 20.0 * 0.3)
    watts = sample(client, "greenroute_device_power_watts", **labels)
    assert watts is not None and watts >= 20.0 * 0.9


def test_rapl_meter_serves_requests_and_device_energy(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    root = make_powercap(tmp_path / "powercap", {0: 1_000_000})
    client = make_client(rapl_root=root, device_sample_period_s=0.05)
    assert client.get("/ready").status_code == 200
    energy = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).json()["energy"]
    assert energy["source"] == "rapl" and energy["estimated"] is False
    meter = client.get("/v1/variants").json()["energy_meter"]
    assert meter["source"] == "rapl" and "intel-rapl:0(package)" in meter["description"]
    labels = {"device": "cpu", "source": "rapl"}
    before = sample(client, "greenroute_device_energy_joules_total", **labels) or 0.0
    set_energy(root, "intel-rapl:0", 4_000_000)  # the package spends 3 J
    assert wait_for(lambda: (sample(client, "greenroute_device_energy_joules_total", **labels)
                             or 0.0) == pytest.approx(before + 3.0))
    assert sample(client, "greenroute_device_energy_joules_total", device="cpu",
                  source="estimate") is None


def test_prefill_and_generation_joules_add_up_in_answers_and_in_prometheus(
        client: TestClient) -> None:
    """Each answer's joules apart by phase (the MLCommons power proposal's names) add up to its
    joules, a long prompt's prefill costs more than a short one's, and Prometheus's phase
    counters grow by what the answers said."""
    def phases() -> tuple[float, float]:
        got = [sample(client, "greenroute_phase_energy_joules_total", phase=p, variant="full")
               for p in ("prefill", "generation")]
        assert None not in got  # every child exists from start-up
        return got[0] or 0.0, got[1] or 0.0

    before = phases()
    answers = []
    for prompt in ("x", "The json module can parse and write JSON documents, " * 8):
        body = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 4,
                                                 "variant": "full"}).json()
        e = body["energy"]
        assert e["prefill_energy_joules"] > 0 and e["generation_energy_joules"] > 0
        assert e["prefill_energy_joules"] + e["generation_energy_joules"] == pytest.approx(
            e["joules"], rel=1e-9)
        assert e["energy_per_token_joules"] == pytest.approx(
            e["generation_energy_joules"] / body["usage"]["completion_tokens"])
        assert e["measurement_method"].startswith("estimate (an estimate)")
        answers.append(e)
    assert answers[1]["prefill_energy_joules"] > answers[0]["prefill_energy_joules"]
    after = phases()
    assert after[0] - before[0] == pytest.approx(
        sum(a["prefill_energy_joules"] for a in answers), rel=1e-6)
    assert after[1] - before[1] == pytest.approx(
        sum(a["generation_energy_joules"] for a in answers), rel=1e-6)
    usage = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()["usage"]
    assert usage["prefill_energy_joules"] + usage["generation_energy_joules"] == pytest.approx(
        usage["energy_joules"], rel=1e-9)


def test_the_marginal_joules_gauge_is_scraped_at_both_floors(client: TestClient) -> None:
    """Brought up to date at the scrape from the router's pricing of a reference request."""
    quiet = sample(client, "greenroute_marginal_joules_per_token", min_quality="0")
    exact = sample(client, "greenroute_marginal_joules_per_token", min_quality="1")
    assert quiet is not None and exact is not None
    assert 0 < quiet <= exact  # any rung costs no more than full's exact output
