"""``greenroute bench serve``: the live service under load, continuous batching included.

1. Overhead: the same prompts (greedy, ``new_tokens`` each) through ``POST /v1/generate`` on a
   live uvicorn process and through a direct call of the same variant in this process,
   interleaved prompt by prompt; median difference in ms and as a fraction of the direct time.
2. Load on one variant: 1, 4, 8 and 16 concurrent clients, each sending streamed requests back
   to back (greedy, EOS ignored so every request makes ``new_tokens``): aggregate generated
   tokens/s, joules per generated token (the requests' ledger shares over their tokens; the
   service's meter says what it measures), p50/p99 time to first token and per-token latency,
   429s. Targets (issue 10): 16 clients ≥ 4× one client's tokens/s; joules/token at 8 clients
   ≤ 0.35× one client's.
3. Sampling cost at one client on every variant: greedy and temperature-1 requests taking turns;
   median tokens/s of each and their ratio (target ≥ 0.9).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
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


def streamed(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: status, time to first token, per-token gaps, tokens, joules."""
    t0 = time.perf_counter()
    times: list[float] = []
    done: dict[str, Any] = {}
    with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "token":
                times.append(time.perf_counter())
            elif event["type"] == "done":
                done = event
    tokens = done["usage"]["completion_tokens"]
    return {"status": 200, "ttft_s": times[0] - t0 if times else None,
            "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            "tokens": tokens, "joules": done["energy"]["joules"],
            "source": done["energy"]["source"], "seconds": time.perf_counter() - t0}


def load_test(url: str, body: dict[str, Any], clients: int,
              requests_per_client: int) -> dict[str, Any]:
    def one_client(i: int) -> list[dict[str, Any]]:
        with httpx.Client(base_url=url, timeout=600) as c:
            return [streamed(c, {**body, "prompt": PROMPTS[(i + k) % len(PROMPTS)]})
                    for k in range(requests_per_client)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [x for chunk in pool.map(one_client, range(clients)) for x in chunk]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"requests": len(results), "ok": len(ok),
            "rejected_429": sum(1 for r in results if r["status"] == 429),
            "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "joules_per_token": sum(r["joules"] for r in ok) / max(1, tokens),
            "energy_source": ok[0]["source"] if ok else None,
            "ttft_p50_ms": 1000 * _percentile(ttft, 0.5) if ttft else None,
            "ttft_p99_ms": 1000 * _percentile(ttft, 0.99) if ttft else None,
            "tpot_p50_ms": 1000 * _percentile(tpot, 0.5) if tpot else None,
            "tpot_p99_ms": 1000 * _percentile(tpot, 0.99) if tpot else None}


def sampling_cost(url: str, variants: list[str], new_tokens: int,
                  rounds: int) -> dict[str, dict[str, float]]:
    """Greedy and temperature-1 tokens/s per variant, one client, the two taking turns."""
    rates: dict[str, dict[str, list[float]]] = {v: {"greedy": [], "t1": []} for v in variants}
    with httpx.Client(base_url=url, timeout=600) as c:
        for k in range(rounds):
            for v in variants:
                for mode, extra in (("greedy", {"temperature": 0.0}),
                                    ("t1", {"temperature": 1.0, "seed": k})):
                    r = streamed(c, {"prompt": PROMPTS[k % len(PROMPTS)], "variant": v,
                                     "max_new_tokens": new_tokens, **extra})
                    if r["status"] == 200 and r["tokens"] > 1 and r["tpot_s"]:
                        rates[v][mode].append(1.0 / r["tpot_s"])
    out = {}
    for v, m in rates.items():
        g, t = statistics.median(m["greedy"]), statistics.median(m["t1"])
        out[v] = {"greedy_tok_s": g, "t1_tok_s": t, "ratio": t / g}
    return out


def run_bench(ladder: Path, variant: str = "full", new_tokens: int = 64, repeats: int = 3,
              threads: int = 2, concurrency: tuple[int, ...] = (1, 4, 8, 16),
              requests_per_client: int = 4, sampling_rounds: int = 5) -> dict[str, Any]:
    from models.runtime.engine.base import GenerationParams
    from models.runtime.ladder import load_ladder
    from models.runtime.manifest import Manifest

    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64",
           "GREENROUTE_VARIANTS": variant}
    with live_service(ladder, env) as client:
        url = str(client.base_url).rstrip("/")
        engine = load_ladder(ladder, threads=threads, only=[variant]).engines[variant]
        params = GenerationParams(max_new_tokens=new_tokens)
        body: dict[str, Any] = {"max_new_tokens": new_tokens, "variant": variant}
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
        fixed = {**body, "ignore_eos": True}
        load = {str(n): load_test(url, fixed, n, requests_per_client) for n in concurrency}

    variants = [v.name for v in Manifest.load(ladder).ordered()]
    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64"}
    with live_service(ladder, env) as client:
        sampling = sampling_cost(str(client.base_url).rstrip("/"), variants, new_tokens,
                                 sampling_rounds)
    return {"variant": variant, "new_tokens": new_tokens, "threads": threads,
            "prompts": len(PROMPTS), "repeats": repeats, "overhead": overhead,
            "requests_per_client": requests_per_client, "load": load, "sampling": sampling}


def report(f: dict[str, Any]) -> str:
    o = f["overhead"]
    lines = [
        f"variant {f['variant']}, {f['new_tokens']} new tokens, greedy, {f['threads']} threads, "
        f"{f['prompts']} prompts x {f['repeats']}",
        f"direct median {o['direct_median_ms']:.1f} ms, HTTP median {o['http_median_ms']:.1f} ms",
        f"HTTP overhead: median {o['overhead_median_ms']:.2f} ms = "
        f"{100 * o['overhead_fraction']:.1f} % (target <= 5 %): "
        f"{'met' if o['overhead_fraction'] <= 0.05 else 'MISSED'}",
        "",
        f"load on {f['variant']}: {f['requests_per_client']} streamed requests per client, "
        f"{f['new_tokens']} tokens each (EOS ignored); continuous batching",
        f"{'clients':>8}{'ok':>5}{'429':>5}{'tok/s':>8}{'J/tok':>9}{'TTFT p50':>10}"
        f"{'p99':>8}{'TPOT p50':>10}{'p99':>8}  (ms)",
    ]
    load = f["load"]
    for clients, r in load.items():
        lines.append(
            f"{clients:>8}{r['ok']:>5}{r['rejected_429']:>5}{r['tokens_per_s']:>8.1f}"
            f"{r['joules_per_token']:>9.4f}{(r['ttft_p50_ms'] or 0):>10.1f}"
            f"{(r['ttft_p99_ms'] or 0):>8.1f}{(r['tpot_p50_ms'] or 0):>10.1f}"
            f"{(r['tpot_p99_ms'] or 0):>8.1f}")
    one = load.get("1")
    if one:
        source = one["energy_source"]
        if "16" in load:
            x = load["16"]["tokens_per_s"] / one["tokens_per_s"]
            lines.append(f"tokens/s at 16 clients = {x:.2f}x one client's (target >= 4): "
                         f"{'met' if x >= 4 else 'MISSED'}")
        if "8" in load:
            j = load["8"]["joules_per_token"] / one["joules_per_token"]
            lines.append(f"joules/token at 8 clients = {j:.2f}x one client's (target <= 0.35; "
                         f"energy source: {source}): {'met' if j <= 0.35 else 'MISSED'}")
    lines += ["", "sampling at temperature 1 vs greedy, one client (median tok/s after the "
              "first token)", f"{'variant':<16}{'greedy':>9}{'t=1':>9}{'ratio':>8}"]
    for v, s in f["sampling"].items():
        lines.append(f"{v:<16}{s['greedy_tok_s']:>9.1f}{s['t1_tok_s']:>9.1f}{s['ratio']:>8.2f}"
                     f"  {'met' if s['ratio'] >= 0.9 else 'MISSED'}")
    return "\n".join(lines)
