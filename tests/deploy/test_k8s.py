"""deploy/k8s: every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, offline,
strict), the ServiceMonitor CRD by its shape, and the manifests against each other and the image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.deploy.conftest import K8S, ROOT, load_yaml_documents, missing_tool

# Oldest and newest Kubernetes minor versions the manifests are checked against.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources the Kubernetes schemas cannot know; checked by shape below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
MANIFESTS = sorted(K8S.glob("*.yaml"))


def resources() -> dict[str, dict[str, Any]]:
    """kind → resource (one of each kind here)."""
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in load_yaml_documents(path):
            assert doc["kind"] not in found, f"second {doc['kind']} in {path.name}"
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schemas(path: Path, version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install -e '.[dev]')")
    for doc in load_yaml_documents(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) not in CRDS:
                raise
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name} ({version}): {err.message} at {list(err.path)}")


def test_validation_rejects_a_misspelt_field() -> None:
    """The strict check is real: a typo in a probe is an error, not a silent default."""
    import kubernetes_validate

    deployment = resources()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["periodSecnds"] = container["readinessProbe"].pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_servicemonitor_scrapes_the_service_metrics_port() -> None:
    r = resources()
    monitor, service = r["ServiceMonitor"], r["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+[smh]", endpoint[key]), key


def container() -> dict[str, Any]:
    (c,) = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_service_and_disruption_budget_select_the_pods_on_the_image_port() -> None:
    r = resources()
    pod_labels = r["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert matches(r["Deployment"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(r["Service"]["spec"]["selector"], pod_labels)
    assert matches(r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    (service_port,) = r["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == 8000
    assert "EXPOSE 8000" in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_probes_resources_and_graceful_termination() -> None:
    r = resources()
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    grace = float(r["ConfigMap"]["data"]["GREENROUTE_SHUTDOWN_GRACE_S"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    pod = r["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    assert r["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_pods_run_as_the_image_user_without_secrets_in_config() -> None:
    r = resources()
    pod = r["Deployment"]["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"),
                     re.MULTILINE)
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    settings = {f"GREENROUTE_{f.upper()}" for f in Settings.model_fields}
    assert set(r["ConfigMap"]["data"]) <= settings
    assert "GREENROUTE_API_KEYS" not in r["ConfigMap"]["data"]
    (keys,) = [e for e in container()["env"] if e["name"] == "GREENROUTE_API_KEYS"]
    # the pod listens beyond loopback: it must not start without keys
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is False
    # one onnxruntime thread per requested core
    threads = int(r["ConfigMap"]["data"]["GREENROUTE_THREADS"])
    assert threads == int(container()["resources"]["requests"]["cpu"])


def test_autoscaler_targets_the_deployment() -> None:
    r = resources()
    hpa = r["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", r["Deployment"]["metadata"]["name"])
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["minReplicas"] <= r["Deployment"]["spec"]["replicas"] <= hpa["maxReplicas"]
