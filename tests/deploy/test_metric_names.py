"""Every metric name the deploy files use exists in the live service's /metrics output, so a
renamed metric breaks this test instead of silently emptying a dashboard panel or an alert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DASHBOARD, DEPLOY, K8S, load_yaml_documents

# Files whose text may name metrics: dashboard, Prometheus config and rules, k8s manifests.
METRIC_FILES = [*sorted(DASHBOARD.parent.glob("*.json")), DEPLOY / "prometheus" / "prometheus.yml",
                DEPLOY / "prometheus" / "rules.yml", *sorted(K8S.glob("*.yaml")),
                *sorted((K8S / "scaling").glob("*.yaml"))]
# A Prometheus name (recording rules have colons) that mentions the service's prefix.
NAME = re.compile(r"(?<![\w:])[a-zA-Z_:][\w:]*greenroute_[\w:]*|(?<![\w:])greenroute_[\w:]*")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "untyped": ("",), "info": ("_info",)}


def series_names(exposition: str) -> set[str]:
    """Every sample name each exposed family can have, whether or not it has samples yet
    (families with only HELP/TYPE still parse: e.g. route decisions before any request)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def used_names(text: str) -> set[str]:
    return set(NAME.findall(text))


def recording_rules() -> set[str]:
    doc = load_yaml_documents(DEPLOY / "prometheus" / "rules.yml")[0]
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def adapter_names() -> set[str]:
    """Pods metrics prometheus-adapter makes from the service's series (renamed)."""
    doc = load_yaml_documents(K8S / "scaling" / "prometheus-adapter-rules.yaml")[0]
    return {r["name"]["as"] for r in yaml.safe_load(doc["data"]["config.yaml"])["rules"]}


@pytest.fixture(scope="module")
def live_names(client: TestClient) -> set[str]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    names = series_names(resp.text)
    assert "greenroute_requests_total" in names  # the fixture really is the service
    return names


def test_extractor_finds_names_and_rule_names() -> None:
    text = ('sum by (variant) (rate(greenroute_energy_joules_total{instance=~"$i"}[5m])) / '
            "variant:greenroute_joules_per_token:rate5m + greenroute_queue_depth")
    assert used_names(text) == {"greenroute_energy_joules_total", "greenroute_queue_depth",
                                "variant:greenroute_joules_per_token:rate5m"}


def test_series_names_cover_families_without_samples() -> None:
    exposition = ("# HELP greenroute_route_decisions_total Routing decisions\n"
                  "# TYPE greenroute_route_decisions_total counter\n"
                  "# HELP greenroute_request_energy_joules Energy per request\n"
                  "# TYPE greenroute_request_energy_joules histogram\n")
    assert series_names(exposition) >= {"greenroute_route_decisions_total",
                                        "greenroute_request_energy_joules_bucket",
                                        "greenroute_request_energy_joules_sum"}


@pytest.mark.parametrize("path", METRIC_FILES, ids=lambda p: p.name)
def test_every_metric_name_in_deploy_files_is_exposed(path: Path, live_names: set[str]) -> None:
    text = path.read_text(encoding="utf-8")
    # prometheus-adapter's renamed Pods metrics: what its rules make ("as:") and the adapter
    # HPA reads; every other name, the rules' sources included, must be the service's
    text = re.sub(r'as: "[^"]*"', "", text)
    made = adapter_names() if path.name == "hpa-prometheus-adapter.yaml" else set()
    rules = recording_rules()
    unknown = {n for n in used_names(text) if n not in live_names and n not in rules
               and n not in made}
    assert not unknown, f"{path.name} uses metrics the service does not expose: {unknown}"


def test_recording_rules_follow_level_metric_operation_naming() -> None:
    for rule in recording_rules():
        level, metric, _ = rule.split(":")
        assert level and metric.startswith("greenroute_"), rule


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    """Average watts and joules per request by variant, joules per generated token, routing
    mix, latency percentiles, time to first token and per output token, queue depth, device
    power."""
    used = used_names(DASHBOARD.read_text(encoding="utf-8"))
    assert used >= {
        "greenroute_request_power_watts_sum", "greenroute_request_power_watts_count",
        "greenroute_request_energy_joules_sum", "greenroute_request_energy_joules_count",
        "greenroute_energy_joules_total", "greenroute_generated_tokens_total",
        "greenroute_route_decisions_total", "greenroute_request_duration_seconds_bucket",
        "greenroute_queue_depth", "greenroute_device_power_watts",
        "greenroute_time_to_first_token_seconds_bucket",
        "greenroute_time_per_output_token_seconds_bucket",
    }
