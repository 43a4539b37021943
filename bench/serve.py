"""``greenroute bench serve``: HTTP overhead and throughput of the live service.

1. Overhead: the same prompts (greedy, 64 new tokens) through ``POST /v1/generate`` on a live
   uvicorn process and through a direct call of the same variant and runtime in this process,
   interleaved prompt by prompt; median difference in ms and as a fraction of the direct time.
2. Load: requests/s and p50/p99 latency with 1, 4 and 16 concurrent clients (429s counted).
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.live import live_service

PROMPTS = [
    "The json module", "Return a new list", "Raise ValueError if", "The interpreter reads",
    "A context manager is", "Use the logging module to", "This function returns the",
    "Changed in version 3.11:",
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_bench(ladder: Path, variant: str = "full", new_tokens: int = 64, repeats: int = 3,
              threads: int = 2, concurrency: tuple[int, ...] = (1, 4, 16),
              requests_per_client: int = 4) -> dict[str, Any]:
    from models.engine.base import GenerationParams
    from models.ladder import load_ladder

    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64",
           "GREENROUTE_VARIANTS": variant}
    with live_service(ladder, env) as client:
        url = str(client.base_url).rstrip("/")
        engine = load_ladder(ladder, threads=threads, only=[variant]).engines[variant]
        params = GenerationParams(max_new_tokens=new_tokens)
        body = {"max_new_tokens": new_tokens, "variant": variant}
        for p in PROMPTS[:2]:  # warm both paths
            engine.generate(p, params)
            client.post("/v1/generate", json={**body, "prompt": p})
        diffs, directs, https = [], [], []
        for _ in range(repeats):
            for p in PROMPTS:
                t = time.perf_counter()
                direct = engine.generate(p, params)
                d = time.perf_counter() - t
                t = time.perf_counter()
                resp = client.post("/v1/generate", json={**body, "prompt": p}).json()
                h = time.perf_counter() - t
                assert resp["text"] == direct.text, "HTTP and direct outputs differ"
                diffs.append(h - d)
                directs.append(d)
                https.append(h)
        engine.close()
        overhead = {"direct_median_ms": 1000 * statistics.median(directs),
                    "http_median_ms": 1000 * statistics.median(https),
                    "overhead_median_ms": 1000 * statistics.median(diffs),
                    "overhead_fraction": statistics.median(diffs) / statistics.median(directs)}

        load: dict[str, Any] = {}
        for clients in concurrency:
            def one_client(i: int) -> list[tuple[int, float]]:
                out = []
                with httpx.Client(base_url=url, timeout=300) as c:
                    for k in range(requests_per_client):
                        prompt = PROMPTS[(i + k) % len(PROMPTS)]
                        t = time.perf_counter()
                        r = c.post("/v1/generate", json={**body, "prompt": prompt})
                        out.append((r.status_code, time.perf_counter() - t))
                return out

            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                results = [x for chunk in pool.map(one_client, range(clients)) for x in chunk]
            wall = time.perf_counter() - t0
            ok = [lat for code, lat in results if code == 200]
            load[str(clients)] = {
                "requests": len(results), "ok": len(ok),
                "rejected_429": sum(1 for code, _ in results if code == 429),
                "requests_per_s": len(ok) / wall,
                "p50_ms": 1000 * _percentile(ok, 0.5) if ok else None,
                "p99_ms": 1000 * _percentile(ok, 0.99) if ok else None,
            }
        return {"variant": variant, "new_tokens": new_tokens, "threads": threads,
                "prompts": len(PROMPTS), "repeats": repeats, "overhead": overhead,
                "load": load}


def report(f: dict[str, Any]) -> str:
    o = f["overhead"]
    lines = [
        f"variant {f['variant']}, {f['new_tokens']} new tokens, greedy, {f['threads']} threads, "
        f"{f['prompts']} prompts x {f['repeats']}",
        f"direct median {o['direct_median_ms']:.1f} ms, HTTP median {o['http_median_ms']:.1f} ms",
        f"HTTP overhead: median {o['overhead_median_ms']:.2f} ms = "
        f"{100 * o['overhead_fraction']:.1f} % (target <= 5 %): "
        f"{'met' if o['overhead_fraction'] <= 0.05 else 'MISSED'}",
        f"{'clients':>8}{'ok':>6}{'429':>6}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    for clients, r in f["load"].items():
        lines.append(f"{clients:>8}{r['ok']:>6}{r['rejected_429']:>6}{r['requests_per_s']:>9.2f}"
                     f"{(r['p50_ms'] or 0):>10.1f}{(r['p99_ms'] or 0):>10.1f}")
    return "\n".join(lines)
