"""App fixtures: the real app through its lifespan (in process) and a real uvicorn process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def wait_ready(get: Callable[[str], Any], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("service did not become ready")


def wait_ready_says(get: Callable[[str], Any], text: str, timeout_s: float = 60.0) -> Any:
    """Poll ``/ready`` until its answer mentions ``text`` (a load that fails in the background);
    the last answer either way."""
    deadline = time.monotonic() + timeout_s
    resp = get("/ready")
    while text not in resp.text and time.monotonic() < deadline:
        time.sleep(0.05)
        resp = get("/ready")
    return resp


@pytest.fixture(scope="module")
def make_client(tiny_ladder: Path) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)`` → a started TestClient on the tiny ladder (or the
    ``ladder_dir`` given)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(**{"ladder_dir": tiny_ladder, "threads": 1, **overrides})
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        wait_ready(client.get)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """``greenroute serve`` in a subprocess on a free loopback port."""

    def __init__(self, ladder: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "GREENROUTE_THREADS": "1", **env}
        # the server's log goes to a file: an undrained pipe would block it once full
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop)
            "w+", prefix="greenroute-live-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port), "--ladder",
             str(ladder), "--log-level", "warning"],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        try:
            wait_ready(self.http.get)
        except TimeoutError:
            self.stop()
            raise

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from the live /metrics text (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = int(self.proc.wait())
        self.log.close()
        return code

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.flush()
        return Path(self.log.name).read_text()


@pytest.fixture
def live_server(tiny_ladder: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(**env: str) -> LiveServer:
        server = LiveServer(tiny_ladder, {f"GREENROUTE_{k.upper()}": v for k, v in env.items()})
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
