"""The image smoke test (deploy/image-smoke.sh, `make image-test`) is not run by CI (a cold
build takes ~30 min here): these checks keep it runnable and its metric list in step."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.metrics import Metrics
from tests.deploy.conftest import DEPLOY, ROOT

SMOKE = DEPLOY / "image-smoke.sh"
BUILD = DEPLOY / "docker" / "build-image.sh"
COMPOSE_TEST = DEPLOY / "compose-test.sh"
CHECKS = DEPLOY / "docker" / "smoke_checks.py"


def load_checks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("smoke_checks", CHECKS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_scripts_are_executable_bash_scripts_make_runs() -> None:
    scripts = (SMOKE, BUILD, COMPOSE_TEST, DEPLOY / "docker" / "debian-base.sh")
    for script in scripts:
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^image-test:\n\tdeploy/image-smoke\.sh$", makefile, re.MULTILINE)
    assert re.search(r"^compose-test:.*\n\tdeploy/compose-test\.sh$", makefile, re.MULTILINE)


def test_smoke_build_passes_local_differences_as_arguments_and_mounts() -> None:
    text = BUILD.read_text(encoding="utf-8")
    for script in (SMOKE, COMPOSE_TEST):  # both build through it
        assert "deploy/docker/build-image.sh" in script.read_text(encoding="utf-8")
    for flag in ('--secret "id=ca,src=$PIP_CERT"', "--build-arg \"PYTHON_IMAGE=$base\"",
                 "--build-arg TORCH_FIND_LINKS=/mnt/torch-wheels",
                 '--volume "$PIP_FIND_LINKS:/mnt/torch-wheels:ro"', "--format docker"):
        assert flag in text, flag
    assert " -f " not in text.split("build --format docker")[1].split("\n\n")[0]  # ./Dockerfile


def test_smoke_checks_know_every_metric_family_the_service_registers() -> None:
    registry = CollectorRegistry()
    Metrics(registry, ["full"], ["cpu"])
    exposed = {f.name.removeprefix("greenroute_"): f.type
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               if f.name.startswith("greenroute_") and not f.name.endswith("_created")}
    checks = load_checks()
    assert exposed.items() <= checks.CONTRACT_FAMILIES.items()
    # what the smoke test tolerates as missing is only what the service does not register yet
    assert checks.CONTRACT_FAMILIES.keys() - exposed.keys() <= checks.PENDING


def test_smoke_metrics_check_passes_on_the_service_exposition(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The parser the smoke test uses against the container, fed the service's own exposition."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["full", "int8"], ["cpu"])
    metrics.meter_opened("cpu", "estimate")  # as the service does at start-up
    metrics.quality.labels("full").set(1.0)
    checks = load_checks()
    monkeypatch.setattr(checks, "get", lambda url: (200, generate_latest(registry).decode()))
    detail = checks.metrics("http://container")
    assert "contract families" in detail
