"""Start ``greenroute serve`` in a subprocess for a benchmark and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_process(argv: list[str], port: int, ready_path: str, what: str,
                 env: dict[str, str] | None = None, ready_timeout_s: float = 120.0,
                 stop_timeout_s: float = 60.0) -> Iterator[tuple[httpx.Client, int]]:
    """Start ``argv`` (a server listening on loopback ``port``), wait until ``ready_path``
    answers 200, and give a client bound to it and its process id; stop it at the end."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if client.get(ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:  # e.g. -4, SIGILL: a -DGGML_NATIVE build from another CPU
                raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not become ready in {ready_timeout_s:g} s")
            time.sleep(0.2)
        yield client, proc.pid
    finally:
        client.close()
        proc.terminate()
        proc.wait(stop_timeout_s)


@contextmanager
def live_service(ladder: Path, env: dict[str, str], ready_timeout_s: float = 120.0,
                 pids: list[int] | None = None) -> Iterator[httpx.Client]:
    """A client bound to a freshly started service on a free loopback port (its process id
    appended to ``pids`` when given)."""
    port = free_port()
    argv = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--ladder", str(ladder),
            "--log-level", "warning"]
    with http_process(argv, port, "/ready", "service", {**os.environ, **env},
                      ready_timeout_s) as (client, pid):
        if pids is not None:
            pids.append(pid)
        yield client
