"""deploy/k8s/scaling: autoscaling on serving signals. The prometheus-adapter HPA and its rules
against the Kubernetes schemas (offline, strict); KEDA's ScaledObject, whose CRD schema is not
available offline, by its documented shape, its HPA behaviour against the HPA schema, and its
queries through promtool's parser."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import K8S, load_yaml_documents, missing_tool
from tests.deploy.test_compose import promtool
from tests.deploy.test_k8s import KUBERNETES_VERSIONS, resources

SCALING = K8S / "scaling"
KEDA = SCALING / "keda-scaledobject.yaml"
ADAPTER_HPA = SCALING / "hpa-prometheus-adapter.yaml"
ADAPTER_RULES = SCALING / "prometheus-adapter-rules.yaml"
# KEDA v2 ScaledObject (keda.sh/v1alpha1): the fields its CRD defines that we may use
SPEC_KEYS = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
             "cooldownPeriod", "idleReplicaCount", "initialCooldownPeriod", "fallback",
             "advanced", "triggers"}
TRIGGER_KEYS = {"type", "name", "metadata", "metricType", "authenticationRef",
                "useCachedMetrics"}
PROMETHEUS_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                   "customHeaders", "ignoreNullValues", "unsafeSsl", "authModes"}


def one(path: Path) -> dict[str, Any]:
    (doc,) = load_yaml_documents(path)
    return doc


def validate(doc: dict[str, Any]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install -e '.[dev]')")
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']} ({version}): {err.message} at {list(err.path)}")


@pytest.mark.parametrize("path", [ADAPTER_HPA, ADAPTER_RULES], ids=lambda p: p.name)
def test_the_adapter_files_validate_against_kubernetes_schemas(path: Path) -> None:
    validate(one(path))


def keda_triggers() -> dict[str, dict[str, Any]]:
    return {t.get("name", t["type"]): t for t in one(KEDA)["spec"]["triggers"]}


def check_shape(doc: dict[str, Any]) -> None:
    """KEDA's ScaledObject shape (the CRD's fields, types and the prometheus trigger's
    metadata)."""
    assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = doc["spec"]
    assert set(spec) <= SPEC_KEYS, set(spec) - SPEC_KEYS
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    assert set(spec["fallback"]) == {"failureThreshold", "replicas"}
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER_KEYS and "metadata" in trigger, trigger
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger
        if trigger["type"] == "prometheus":
            meta = trigger["metadata"]
            assert set(meta) <= PROMETHEUS_KEYS and {"serverAddress", "query",
                                                     "threshold"} <= set(meta)
            assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", meta["serverAddress"])
            assert float(meta["threshold"]) > 0


def test_the_scaled_object_has_kedas_shape() -> None:
    check_shape(one(KEDA))
    # KEDA hands this to the HPA it makes: it must be a valid HPA behaviour
    hpa = one(ADAPTER_HPA)
    spec = one(KEDA)["spec"]
    hpa["spec"]["behavior"] = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    validate(hpa)


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"]["triggers"][0].update(metdata=d["spec"]["triggers"][0].pop("metadata")),
    lambda d: d["spec"].update(maxReplicas=d["spec"].pop("maxReplicaCount")),
    lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=8),
])
def test_a_misshapen_scaled_object_is_caught(break_it: Any) -> None:
    """The shape check is real: a misspelt field, or a number where KEDA wants a string."""
    doc = one(KEDA)
    break_it(doc)
    with pytest.raises((AssertionError, KeyError)):
        check_shape(doc)


def test_both_scale_the_deployment_on_rows_and_queue_with_cpu_as_fallback() -> None:
    deployment = resources()["Deployment"]
    keda, hpa = one(KEDA)["spec"], one(ADAPTER_HPA)["spec"]
    for target in (keda["scaleTargetRef"], hpa["scaleTargetRef"]):
        assert (target["kind"], target["name"]) == ("Deployment",
                                                    deployment["metadata"]["name"])
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (hpa["minReplicas"],
                                                                  hpa["maxReplicas"])
    t = keda_triggers()
    assert "greenroute_batch_size" in t["rows-in-use"]["metadata"]["query"]
    assert "greenroute_queue_depth" in t["queue-depth"]["metadata"]["query"]
    assert t["cpu"]["metricType"] == "Utilization"
    pods = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"]
            for m in hpa["metrics"] if m["type"] == "Pods"}
    # the same thresholds per replica on both
    assert float(pods["greenroute_rows_in_use"]) == float(t["rows-in-use"]["metadata"]["threshold"])
    assert float(pods["greenroute_queue_depth"]) == float(t["queue-depth"]["metadata"]["threshold"])
    (cpu,) = [m for m in hpa["metrics"] if m["type"] == "Resource"]
    # a fallback: above what a replica generating at its capacity keeps busy (the CPU-only HPA)
    cpu_only = resources()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]
    assert (cpu["resource"]["target"]["averageUtilization"]
            > cpu_only["resource"]["target"]["averageUtilization"])
    assert int(t["cpu"]["metadata"]["value"]) == cpu["resource"]["target"]["averageUtilization"]


def test_the_adapter_rules_make_the_pods_metrics_the_hpa_reads() -> None:
    config = yaml.safe_load(one(ADAPTER_RULES)["data"]["config.yaml"])
    made = {r["name"]["as"]: r for r in config["rules"]}
    hpa = one(ADAPTER_HPA)["spec"]
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert wanted <= set(made)
    for rule in made.values():
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"]
        assert re.match(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])


def test_keda_queries_are_valid_promql(tmp_path: Path) -> None:
    queries = [t["metadata"]["query"] for t in keda_triggers().values() if "query" in t["metadata"]]
    rules = {"groups": [{"name": "keda", "rules": [
        {"record": f"keda:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "keda-rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
