"""``greenroute bench route``: a mixed workload run three ways against the live service.

Modes: routed (``auto``), always ``full``, always the cheapest variant (lowest calibrated
joules per token), each at every concurrency level asked for. One client: the modes take turns
request by request (their order rotating), so the host's drift between minutes falls on every
mode alike. Several clients: each mode runs the whole workload in its turn (clients take the
next request as they finish one; with continuous batching, concurrent requests share steps,
and mixing modes would put them in one another's batches). Printed per
mode: total and per-request joules, quality-floor violations,
latency-budget hit rate, p50/p99 latency. The workload (``bench/workloads/mixed.jsonl``) is
generated once by :func:`make_workload` and committed, so every run sends the same requests.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.live import live_service

EXACT = ("full", "full-speculative")  # the reference's exact output: every floor accepts them
WORKLOAD = Path(__file__).parent / "workloads" / "mixed.jsonl"
FLOORS = ((0.0, 20), (0.5, 15), (0.8, 25), (0.9, 20), (0.95, 10), (1.0, 10))  # (floor, weight)
# tight .. loose, per requested token, on top of BASE_MS; chosen for SmolLM2-135M on a 2-core CPU
# (full decodes ~20 ms/token, int8 ~7, the distilled rungs 2-5): the tightest leaves full ~1.5x
# its decode time, the loosest suits a background job
MS_PER_TOKEN_BUDGETS = (30.0, 60.0, 120.0, 300.0)
BASE_MS = 250.0  # prefill of up to ~100 prompt tokens on full, and the HTTP round trip


def make_workload(n: int = 240, seed: int = 7) -> list[dict[str, Any]]:
    """Prompts cut from the held-out text (4-400 chars), 8-96 new tokens, varied budgets."""
    from models.pipeline.ladder import DEFAULT_HELDOUT

    rng = random.Random(seed)
    # plain text: the held-out file's ChatML markers removed
    text = re.sub(r"<\|im_(?:start|end)\|>(?:user|assistant)?\n?", "\n",
                  DEFAULT_HELDOUT.read_text(encoding="utf-8"))
    floors = [f for f, w in FLOORS for _ in range(w)]
    out = []
    for i in range(n):
        length = rng.choice((4, 16, 60, 150, 400))
        start = rng.randrange(0, len(text) - length)
        prompt = text[start : start + length]
        new = rng.choice((8, 16, 32, 64, 96))
        out.append({"id": i, "prompt": prompt if prompt.strip() else "The",
                    "max_new_tokens": new,
                    "latency_ms": round(BASE_MS + new * rng.choice(MS_PER_TOKEN_BUDGETS), 1),
                    "min_quality": rng.choice(floors)})
    return out


def write_workload(path: Path = WORKLOAD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_workload()))
    return path


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _send(c: httpx.Client, r: dict[str, Any], pin: str | None) -> tuple[int, float, Any]:
    body: dict[str, Any] = {"prompt": r["prompt"], "max_new_tokens": r["max_new_tokens"],
                            "budget": {"latency_ms": r["latency_ms"],
                                       "min_quality": r["min_quality"]}}
    if pin:
        body["variant"] = pin
    t = time.perf_counter()
    resp = c.post("/v1/generate", json=body)
    return resp.status_code, 1000 * (time.perf_counter() - t), resp.json()


def run_mode(url: str, reqs: list[dict[str, Any]], pin: str | None, clients: int,
             quality: dict[str, float]) -> dict[str, Any]:
    """Every request once, from ``clients`` concurrent clients (each takes the next one)."""
    todo = iter(reqs)
    lock = threading.Lock()

    def client(_: int) -> list[tuple[dict[str, Any], int, float, Any]]:
        out: list[tuple[dict[str, Any], int, float, Any]] = []
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    r = next(todo, None)
                if r is None:
                    return out
                out.append((r, *_send(c, r, pin)))

    with cf.ThreadPoolExecutor(clients) as pool:
        done = [x for part in pool.map(client, range(clients)) for x in part]
    return summarize(done, quality)


def run_turns(url: str, reqs: list[dict[str, Any]], modes: dict[str, str | None],
              quality: dict[str, float]) -> dict[str, dict[str, Any]]:
    """One client, every request once per mode, the modes taking turns (order rotating)."""
    names = list(modes)
    done: dict[str, list[tuple[dict[str, Any], int, float, Any]]] = {m: [] for m in names}
    with httpx.Client(base_url=url, timeout=600) as c:
        for i, r in enumerate(reqs):
            for j in range(len(names)):
                mode = names[(i + j) % len(names)]
                done[mode].append((r, *_send(c, r, modes[mode])))
    return {mode: summarize(d, quality) for mode, d in done.items()}


def summarize(done: list[tuple[dict[str, Any], int, float, Any]],
              quality: dict[str, float]) -> dict[str, Any]:
    """One mode's responses: energy, floor violations, budget hits, latency, mix."""
    joules, lats, hits, violations, chosen = [], [], 0, 0, []
    by_variant: dict[str, float] = {}
    rows = []
    for r, status, lat, out in done:
        if status != 200:
            raise RuntimeError(f"request {r['id']}: {status} {out}")
        joules.append(out["energy"]["joules"])
        lats.append(lat)
        hits += lat <= r["latency_ms"]
        variant = out["variant"]
        by_variant[variant] = by_variant.get(variant, 0.0) + out["energy"]["joules"]
        rows.append({"id": r["id"], "variant": variant, "joules": out["energy"]["joules"],
                     "prompt_tokens": out["usage"]["prompt_tokens"],
                     "completion_tokens": out["usage"]["completion_tokens"],
                     "finish_reason": out["finish_reason"], "latency_ms": round(lat, 1)})
        violations += not (quality[variant] >= r["min_quality"] or variant in EXACT)
        chosen.append(variant)
    return {"requests": len(done), "total_joules": sum(joules),
            "mean_joules": statistics.mean(joules), "quality_violations": violations,
            "latency_hit_rate": hits / len(done), "p50_ms": _pct(lats, 0.5),
            "p99_ms": _pct(lats, 0.99), "mix": {v: chosen.count(v) for v in sorted(set(chosen))},
            "joules_by_variant": dict(sorted(by_variant.items())),
            "per_request": sorted(rows, key=lambda x: x["id"]),
            "energy_source": done[-1][3]["energy"]["source"]}


def run_bench(ladder: Path, workload: Path = WORKLOAD, threads: int = 2,
              clients: tuple[int, ...] = (1,), requests: int | None = None) -> dict[str, Any]:
    reqs = [json.loads(line) for line in workload.read_text().splitlines() if line.strip()]
    reqs = reqs[:requests] if requests else reqs
    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64"}
    with live_service(ladder, env) as c:
        url = str(c.base_url).rstrip("/")
        variants = {v["name"]: v for v in c.get("/v1/variants").json()["data"] if v["loaded"]}
        quality = {n: v["quality"] for n, v in variants.items()}

        def joules_per_token(v: dict[str, Any]) -> float:
            return float(v["cost"]["decode_ms_per_token"] * v["cost"]["watts"])

        cheapest = min(variants.values(), key=joules_per_token)["name"]
        modes = {"routed": None, "always-full": "full", f"always-{cheapest}": cheapest}
        results: dict[str, Any] = {}
        for n in clients:
            if n == 1:
                for mode, r in run_turns(url, reqs, modes, quality).items():
                    results[f"{mode} @1"] = r
                continue
            for mode, pin in modes.items():
                results[f"{mode} @{n}"] = run_mode(url, reqs, pin, n, quality)
        return {"workload": str(workload), "cheapest": cheapest, "clients": list(clients),
                "modes": results}


def report(f: dict[str, Any]) -> str:
    m = f["modes"]
    lines = [f"workload {f['workload']} ({next(iter(m.values()))['requests']} requests), energy "
             f"source: {next(iter(m.values()))['energy_source']}",
             f"{'mode':<24}{'total J':>10}{'J/req':>9}{'floor viol.':>12}{'budget hit':>11}"
             f"{'p50 ms':>9}{'p99 ms':>9}"]
    for mode, r in m.items():
        lines.append(f"{mode:<24}{r['total_joules']:>10.1f}{r['mean_joules']:>9.3f}"
                     f"{r['quality_violations']:>12}{100 * r['latency_hit_rate']:>10.1f}%"
                     f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}")
    for mode, r in m.items():
        joules = {v: round(j, 1) for v, j in r.get("joules_by_variant", {}).items()}
        lines.append(f"  mix {mode}: {r['mix']}; joules {joules}")
    for n in f["clients"]:
        routed, full = m[f"routed @{n}"], m[f"always-full @{n}"]
        ratio = routed["total_joules"] / full["total_joules"]
        lines.append(f"{n} client(s): routed / always-full energy = {ratio:.2f} (target <= 0.35)"
                     f": {'met' if ratio <= 0.35 else 'MISSED'}; floor violations "
                     f"{routed['quality_violations']} (target 0); budget hit "
                     f"{100 * routed['latency_hit_rate']:.1f} % (target >= 99 %)")
    return "\n".join(lines)
