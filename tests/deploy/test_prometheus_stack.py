"""The repository's Prometheus rules and Grafana queries on a real Prometheus server scraping
the live service (loopback): every recording rule and every dashboard panel has data."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.app.conftest import LiveServer, free_port
from tests.deploy.conftest import DASHBOARD, DEPLOY, find_tool, load_yaml_documents, missing_tool
from tests.deploy.test_compose import grafana_to_promql


def stack_config(target: str, rules: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the compose DNS discovery replaced by ``target``
    and intervals short enough for a test; the rules file is the repository's."""
    config = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "greenroute"]
    job.pop("dns_sd_configs")
    job.pop("relabel_configs")
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config  # type: ignore[no-any-return]


@pytest.fixture
def prometheus(live_server: Callable[..., LiveServer], tmp_path: Path) -> Iterator[
        tuple[str, LiveServer, subprocess.Popen[str]]]:
    """(API URL, the live service it scrapes, its process)."""
    binary = find_tool("prometheus")
    if binary is None:
        missing_tool("the prometheus binary is not installed (apt-get install prometheus)")
    server = live_server()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(stack_config(server.url.removeprefix("http://"),
                                                  DEPLOY / "prometheus" / "rules.yml")))
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address={address}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://{address}", server, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def has_data(url: str, promql: str) -> bool:
    """Whether ``promql`` evaluates (an error fails the test) to at least one finite value."""
    resp = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    if "json" not in resp.headers.get("content-type", ""):
        return False  # 503 in plain text while the server starts
    body = resp.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    result = body["data"]["result"]
    values = [result[1]] if body["data"]["resultType"] == "scalar" else [
        s["value"][1] for s in result]
    return any(math.isfinite(float(v)) for v in values)


def wait_for(proc: subprocess.Popen[str], ok: Callable[[], bool],
             what: str | Callable[[], str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        with contextlib.suppress(httpx.TransportError):  # still starting
            if ok():
                return
        time.sleep(0.5)
    pytest.fail(f"no {what if isinstance(what, str) else what()} after {timeout_s:.0f} s")


def test_rules_and_dashboard_queries_have_data(
        prometheus: tuple[str, LiveServer, subprocess.Popen[str]]) -> None:
    url, server, proc = prometheus
    # rates need a scrape before the requests: counters must be seen to increase
    wait_for(proc, lambda: has_data(url, 'up{job="greenroute"} == 1'), "first scrape")
    for min_quality in (0.0, 1.0, 0.0, 1.0):  # auto-routed: both ends of the ladder
        resp = server.http.post("/v1/generate", json={
            "prompt": "The json module", "max_new_tokens": 8,
            "budget": {"min_quality": min_quality}})
        assert resp.status_code == 200, resp.text
    rules = load_yaml_documents(DEPLOY / "prometheus" / "rules.yml")[0]
    records = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = {f"{p['title']} [{t['refId']}]": grafana_to_promql(t["expr"])
              for p in dashboard["panels"] for t in p.get("targets", [])}
    queries = {**{r: r for r in records}, **panels}
    pending = dict(queries)

    def all_have_data() -> bool:
        nonlocal pending
        pending = {k: q for k, q in pending.items() if not has_data(url, q)}
        return not pending

    wait_for(proc, all_have_data, lambda: f"data for {sorted(pending)}")
