"""``greenroute bench soak``: the service under sustained mixed load, to find leaks and faults.

``clients`` closed-loop clients (default 16) for ``duration_s`` (default 10 minutes) against a
live service on the ladder, each taking the chat workload's requests in a seeded random order
and, per request: a JSON answer (60 %), a stream read to the end (20 %), a stream whose client
leaves after the first event (15 %), or a malformed body (5 %, which must get a 4xx). Every
10 s: the server process's resident memory, the KV memory rows have written
(``greenroute_kv_written_bytes``) and the in-flight gauge. The clients run a warm-up
(``warmup_s``, default 3 minutes, the same mix) before the measured ``duration_s``. Printed:
answers by status (the target is no 5xx), RSS at the end of the warm-up and at the end (target
≤ 5 % growth), how much of that growth is KV pages first written by rows reaching new lengths
(bounded by the KV capacity checked at start-up; the rest would be a leak), and the in-flight
gauge once the clients have stopped (target 0).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.live import live_service
from bench.route import WORKLOAD

_INFLIGHT = re.compile(r"^greenroute_inflight_requests (\S+)$", re.M)
_KV_WRITTEN = re.compile(r"^greenroute_kv_written_bytes\{[^}]*\} (\S+)$", re.M)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def gauges(c: httpx.Client) -> tuple[float, float]:
    """The in-flight gauge and the KV bytes written over all variants (MB)."""
    text = c.get("/metrics").text
    m = _INFLIGHT.search(text)
    kv = sum(float(v) for v in _KV_WRITTEN.findall(text)) / 2**20
    return (float(m.group(1)) if m else -1.0), kv


def _one(c: httpx.Client, r: dict[str, Any], kind: str) -> int:
    body = {"model": "auto", "messages": [{"role": "user", "content": r["prompt"]}],
            "max_tokens": r["max_tokens"], "latency_budget_ms": r["latency_ms"],
            "min_quality": r["min_quality"]}
    if kind == "bad":
        resp = c.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [',
                      headers={"content-type": "application/json"})
        return resp.status_code
    if kind == "json":
        return c.post("/v1/chat/completions", json=body).status_code
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        for _ in resp.iter_lines():
            if kind == "leave":
                break  # closing the response drops the connection
        return resp.status_code


def run_soak(ladder: Path, duration_s: float = 600.0, clients: int = 16,
             threads: int = 2, warmup_s: float = 180.0) -> dict[str, Any]:
    reqs = [json.loads(line) for line in WORKLOAD.read_text().splitlines() if line.strip()]
    kinds = ["json"] * 12 + ["stream"] * 4 + ["leave"] * 3 + ["bad"]
    pids: list[int] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    samples: list[dict[str, float]] = []
    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "16"}
    with live_service(ladder, env, pids=pids) as c:
        pid, t0 = pids[0], time.monotonic()
        stop = t0 + warmup_s + duration_s

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(base_url=str(c.base_url), timeout=600) as mine:
                while time.monotonic() < stop:
                    kind = rng.choice(kinds)
                    try:
                        status = str(_one(mine, rng.choice(reqs), kind))
                    except httpx.HTTPError as err:
                        status = type(err).__name__
                    with lock:
                        statuses[f"{kind} {status}"] += 1

        with cf.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, k) for k in range(clients)]
            while not all(f.done() for f in futures):
                now, kv = gauges(c)
                samples.append({"t_s": round(time.monotonic() - t0, 1),
                                "rss_mb": rss_bytes(pid) / 2**20, "kv_mb": kv, "inflight": now})
                time.sleep(10)
            for f in futures:
                f.result()
        time.sleep(2)  # the last abandoned streams' rows notice their cancellation
        end_inflight, end_kv = gauges(c)
        end_rss = rss_bytes(pid) / 2**20
    warm = next((s for s in samples if s["t_s"] >= warmup_s), samples[-1])
    fivexx = sum(n for k, n in statuses.items() if k.split()[1].startswith("5"))
    bad_ok = all(k.split()[1].startswith("4") for k in statuses if k.startswith("bad"))
    return {"duration_s": duration_s, "warmup_s": warmup_s, "clients": clients,
            "statuses": dict(sorted(statuses.items())),
            "5xx": fivexx, "malformed_all_4xx": bad_ok, "samples": samples,
            "rss_warm_mb": warm["rss_mb"], "rss_end_mb": end_rss,
            "rss_growth": end_rss / warm["rss_mb"] - 1,
            "kv_warm_mb": warm["kv_mb"], "kv_end_mb": end_kv,
            "rss_growth_beyond_kv": (end_rss - warm["rss_mb"] - (end_kv - warm["kv_mb"]))
            / warm["rss_mb"],
            "inflight_end": end_inflight}


def report(f: dict[str, Any]) -> str:
    lines = [f"soak: {f['clients']} clients for {f['duration_s']:.0f} s after a "
             f"{f['warmup_s']:.0f} s warm-up",
             f"  answers: {f['statuses']}",
             f"  5xx: {f['5xx']} (target 0); malformed bodies all 4xx: {f['malformed_all_4xx']}",
             f"  RSS: {f['rss_warm_mb']:.0f} MB after warm-up, {f['rss_end_mb']:.0f} MB at the end"
             f" ({100 * f['rss_growth']:+.1f} %, target <= +5 %)",
             f"  KV written: {f['kv_warm_mb']:.0f} MB after warm-up, {f['kv_end_mb']:.0f} MB at"
             f" the end; RSS growth beyond it {100 * f['rss_growth_beyond_kv']:+.1f} %",
             f"  in-flight gauge after the clients stopped: {f['inflight_end']:g} (target 0)",
             "  RSS MB over time: " + " ".join(f"{s['rss_mb']:.0f}" for s in f["samples"]),
             "  KV written MB over time: " + " ".join(f"{s['kv_mb']:.0f}" for s in f["samples"])]
    return "\n".join(lines)
