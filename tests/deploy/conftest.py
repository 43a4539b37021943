"""Deploy checks: the repository's Dockerfile, compose stack, Prometheus/Grafana and Kubernetes
files, checked with the real tools (hadolint, docker compose, promtool, Kubernetes schemas)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.app.conftest import client, live_server, make_client  # noqa: F401  (live service)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "greenroute.json"


def missing_tool(message: str) -> NoReturn:
    """A check tool is absent: a failure under CI (``.ci/run`` installs it), else a skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    """``name`` from this interpreter's environment first (the dev extra), then ``PATH``."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
