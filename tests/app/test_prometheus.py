"""A real Prometheus server scrapes the live service on loopback; PromQL sees per-variant joules.

Needs the ``prometheus`` binary (Debian package ``prometheus``, installed by ``.ci/run``): under
CI its absence fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import LiveServer, free_port


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "the prometheus binary is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class Prometheus:
    """``prometheus`` scraping ``target`` every 0.5 s, its API on a free loopback port."""

    def __init__(self, binary: str, target: str, root: Path) -> None:
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
            "scrape_configs:\n  - job_name: greenroute\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def query(self, promql: str) -> list[dict[str, object]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        resp.raise_for_status()
        return list(resp.json()["data"]["result"])

    def wait(self, promql: str, ok: Callable[[list[dict[str, object]]], bool],
             timeout_s: float = 30.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.proc.stderr.read()[-2000:]}")
            try:
                result = self.query(promql)
                if ok(result):
                    return result
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} never satisfied; last result {result}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(prometheus_bin, target, tmp_path))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_per_variant_joules(live_server: Callable[..., LiveServer],
                                               prometheus: Callable[[str], Prometheus]) -> None:
    server = live_server(device_sample_period_s="0.2")
    prom = prometheus(server.url.removeprefix("http://"))
    for variant in ("full", "full", "distilled"):
        resp = server.http.post("/v1/generate", json={"prompt": "The json module",
                                                      "max_new_tokens": 8, "variant": variant})
        assert resp.status_code == 200
    by_variant = prom.wait(
        "sum by (variant) (greenroute_energy_joules_total)",
        lambda r: {s["metric"]["variant"]: float(s["value"][1])  # type: ignore[index]
                   for s in r}.get("distilled", 0.0) > 0)
    joules = {s["metric"]["variant"]: float(s["value"][1]) for s in by_variant}  # type: ignore[index]
    assert joules["full"] > 0 and joules["distilled"] > 0 and joules["int8"] == 0
    assert joules["full"] == pytest.approx(server.metric("greenroute_energy_joules_total",
                                                         variant="full"))
    requests = prom.query('sum(greenroute_requests_total{status="ok"})')
    assert float(requests[0]["value"][1]) == 3  # type: ignore[index]
    power = prom.wait('greenroute_device_power_watts{source="estimate"}', lambda r: len(r) == 1)
    assert power[0]["metric"]["device"] == "cpu"  # type: ignore[index]
