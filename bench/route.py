"""``greenroute bench route``: a mixed-floor chat workload served three ways, taking turns in
one run, at several concurrency levels.

Policies:

* ``routed`` — ``model: auto``, the router decides;
* ``always-full`` — every request pinned to ``full``;
* ``static`` — what an operator writes without a router: every request pinned to the variant
  cheapest per token (batch-1 joules per token, from ``/v1/variants`` before any traffic)
  whose quality meets its floor; the exact-output rungs (``full`` and a speculative rung) count
  for a floor of 1.0, but a speculative rung is left out (it is for a quiet device: pinning
  it under load would handicap the baseline).

At every concurrency level the policies take turns (their order rotating from level to level),
each running the whole workload from ``clients`` closed-loop clients, so the host's drift
between minutes falls on all three. Per policy: ledger joules (the requests' own, summed),
device-counter joules and busy joules over the policy's window (``/metrics``, refreshed at every
scrape), wall time, floor violations, latency budgets met, the variant mix and the route
reasons. The workload (``bench/workloads/chat.jsonl``) is generated once from
``chat_prompts.txt`` by :func:`make_workload` and committed, so every run sends the same
requests.

``--scaling`` runs ``full`` alone instead: the same requests from 1 client and then from 16,
greedy, and prints tok/s at each, whether every text is identical, and the requests' joules
over the device counter's and the busy joules over each window (conservation).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.live import live_service

WORKLOADS = Path(__file__).parent / "workloads"
WORKLOAD = WORKLOADS / "chat.jsonl"
PROMPTS = WORKLOADS / "chat_prompts.txt"
EXACT = ("full", "full-speculative")  # the reference's exact output: every floor accepts them
FLOORS = (0.0, 0.5, 0.8, 0.95, 0.99, 1.0)
MAX_TOKENS = (32, 64, 96, 128)
BUDGETS_MS = (3000.0, 5000.0, 8000.0, 12000.0)  # several seconds: a chat turn's patience
POLICIES = ("routed", "always-full", "static")


def make_workload(seed: int = 11) -> list[dict[str, Any]]:
    """One request per prompt: floors spread evenly over :data:`FLOORS` (shuffled), lengths
    and budgets drawn from :data:`MAX_TOKENS` and :data:`BUDGETS_MS`."""
    rng = random.Random(seed)
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    floors = [FLOORS[i % len(FLOORS)] for i in range(len(prompts))]
    rng.shuffle(floors)
    return [{"id": i, "prompt": p, "max_tokens": rng.choice(MAX_TOKENS),
             "latency_ms": rng.choice(BUDGETS_MS), "min_quality": floors[i]}
            for i, p in enumerate(prompts)]


def write_workload(path: Path = WORKLOAD) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_workload()))
    return path


def static_policy(variants: dict[str, dict[str, Any]]) -> dict[float, str]:
    """Each floor's variant under the static policy (see the module doc)."""
    def per_token_joules(v: dict[str, Any]) -> float:
        return float(v["cost"]["decode_ms_per_token"] * v["cost"]["watts"])

    out = {}
    for floor in FLOORS:
        ok = [v for n, v in variants.items() if not v.get("speculative")
              and (n == "full" if floor >= 1.0 else n == "full" or min(v["quality"], 1) >= floor)]
        out[floor] = min(ok, key=per_token_joules)["name"]
    return out


_SAMPLE = re.compile(r"^greenroute_(device_energy|device_busy_energy)_joules_total\{[^}]*\} (\S+)$",
                     re.M)


def device_joules(c: httpx.Client) -> dict[str, float]:
    """The device counters now: all energy (idle included) and busy energy."""
    text = c.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in _SAMPLE.finditer(text)}


def _send(c: httpx.Client, r: dict[str, Any], model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": r["prompt"]}],
            "max_tokens": r["max_tokens"], "temperature": 0,
            "latency_budget_ms": r["latency_ms"], "min_quality": r["min_quality"]}
    t = time.perf_counter()
    resp = c.post("/v1/chat/completions", json=body)
    latency = 1000 * (time.perf_counter() - t)
    if resp.status_code != 200:
        raise RuntimeError(f"request {r['id']}: {resp.status_code} {resp.text[:300]}")
    out = resp.json()
    return {"id": r["id"], "variant": resp.headers["X-Greenroute-Variant"],
            "reason": resp.headers["X-Greenroute-Route-Reason"],
            "joules": out["usage"]["energy_joules"], "tokens": out["usage"]["completion_tokens"],
            "latency_ms": latency, "met": latency <= r["latency_ms"],
            "text": out["choices"][0]["message"]["content"],
            "source": out["usage"]["energy_source"]}


def run_policy(c: httpx.Client, reqs: list[dict[str, Any]], model_of: Any,
               clients: int) -> list[dict[str, Any]]:
    """Every request once from ``clients`` closed-loop clients (each takes the next one)."""
    todo = iter(reqs)
    lock = threading.Lock()

    def client(_: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with httpx.Client(base_url=str(c.base_url), timeout=600) as mine:
            while True:
                with lock:
                    r = next(todo, None)
                if r is None:
                    return out
                out.append(_send(mine, r, model_of(r)))

    with cf.ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(client, range(clients)) for x in part]


def measured(c: httpx.Client, reqs: list[dict[str, Any]], model_of: Any, clients: int,
             quality: dict[str, float]) -> dict[str, Any]:
    """One policy's window: its responses and the device counters around them."""
    before, t0 = device_joules(c), time.perf_counter()
    done = run_policy(c, reqs, model_of, clients)
    wall, after = time.perf_counter() - t0, device_joules(c)
    floor = {r["id"]: r["min_quality"] for r in reqs}
    ledger = sum(d["joules"] for d in done)
    device = after["device_energy"] - before["device_energy"]
    busy = after["device_busy_energy"] - before["device_busy_energy"]
    return {"requests": len(done), "ledger_joules": ledger, "device_joules": device,
            "busy_joules": busy, "ledger_over_device": ledger / device if device else None,
            "ledger_over_busy": ledger / busy if busy else None, "wall_s": wall,
            "tokens": sum(d["tokens"] for d in done),
            "floor_violations": sum(1 for d in done if d["variant"] not in EXACT
                                    and quality[d["variant"]] < floor[d["id"]]),
            "budgets_met": sum(d["met"] for d in done) / len(done),
            "p50_ms": statistics.median(d["latency_ms"] for d in done),
            "mix": dict(sorted(Counter(d["variant"] for d in done).items())),
            "mix_by_floor": {str(f): dict(sorted(Counter(
                d["variant"] for d in done if floor[d["id"]] == f).items())) for f in FLOORS},
            "reasons": dict(sorted(Counter(d["reason"] for d in done).items())),
            "energy_source": done[0]["source"],
            "texts": {d["id"]: d["text"] for d in done}}


def run_bench(ladder: Path, workload: Path = WORKLOAD, threads: int = 2,
              clients: tuple[int, ...] = (1, 4, 8, 16), requests: int | None = None,
              rounds: int = 1) -> dict[str, Any]:
    reqs = [json.loads(line) for line in workload.read_text().splitlines() if line.strip()]
    reqs = reqs[:requests] if requests else reqs
    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64"}
    with live_service(ladder, env) as c:
        variants = {v["name"]: v for v in c.get("/v1/variants").json()["data"] if v["loaded"]}
        quality = {n: v["quality"] for n, v in variants.items()}
        static = static_policy(variants)
        models = {"routed": lambda r: "auto", "always-full": lambda r: "full",
                  "static": lambda r: static[r["min_quality"]]}
        results: dict[str, Any] = {}
        turn = 0
        for _ in range(rounds):
            for n in clients:
                order = POLICIES[turn % 3:] + POLICIES[:turn % 3]
                turn += 1
                for policy in order:
                    r = measured(c, reqs, models[policy], n, quality)
                    key = f"{policy} @{n}"
                    results.setdefault(key, []).append(r)
        learned = {n: v["cost"] for n, v in
                   ((v["name"], v) for v in c.get("/v1/variants").json()["data"] if v["loaded"])}
    return {"workload": str(workload), "requests": len(reqs), "clients": list(clients),
            "rounds": rounds, "static": {str(k): v for k, v in static.items()},
            "runs": results, "learned_costs": learned}


def _total(runs: list[dict[str, Any]], key: str) -> float:
    return float(sum(r[key] for r in runs))


def report(f: dict[str, Any]) -> str:
    runs = f["runs"]
    first = next(iter(runs.values()))[0]
    lines = [f"workload {f['workload']} ({f['requests']} requests x {f['rounds']} round(s)), "
             f"energy source: {first['energy_source']}; static policy: {f['static']}",
             f"{'policy':<18}{'ledger J':>10}{'device J':>10}{'busy J':>9}{'wall s':>8}"
             f"{'floor viol.':>12}{'budgets met':>12}{'p50 ms':>8}"]
    for key, rs in runs.items():
        met = statistics.mean(r["budgets_met"] for r in rs)
        lines.append(f"{key:<18}{_total(rs, 'ledger_joules'):>10.1f}"
                     f"{_total(rs, 'device_joules'):>10.1f}{_total(rs, 'busy_joules'):>9.1f}"
                     f"{_total(rs, 'wall_s'):>8.1f}{int(_total(rs, 'floor_violations')):>12}"
                     f"{100 * met:>11.1f}%{statistics.median(r['p50_ms'] for r in rs):>8.0f}")
    for key, rs in runs.items():
        mix: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for r in rs:
            mix.update(r["mix"])
            reasons.update(r["reasons"])
        lines.append(f"  {key}: mix {dict(sorted(mix.items()))}; reasons "
                     f"{dict(sorted(reasons.items()))}")
        if key.startswith("routed "):
            for fl in FLOORS:
                by: Counter[str] = Counter()
                for r in rs:
                    by.update(r.get("mix_by_floor", {}).get(str(fl), {}))
                lines.append(f"    floor {fl}: {dict(sorted(by.items()))}")
    lines.append("ratios (ledger / device counter):")
    for n in f["clients"]:
        def t(policy: str, key: str, n: int = n) -> float:
            return _total(runs[f"{policy} @{n}"], key)

        routed_ledger, routed_device = t("routed", "ledger_joules"), t("routed", "device_joules")
        lines.append(
            f"  {n:>2} clients: routed/static {routed_ledger / t('static', 'ledger_joules'):.2f}"
            f" / {routed_device / t('static', 'device_joules'):.2f}; routed/always-full "
            f"{routed_ledger / t('always-full', 'ledger_joules'):.2f} / "
            f"{routed_device / t('always-full', 'device_joules'):.2f}")
    lines += median_ratios(runs, f["clients"])
    lines.append("learned step ms by width (1..16), switch ms; then watts by width:")
    for name, cost in f["learned_costs"].items():
        table = cost.get("step_ms_by_rows") or []
        watts = cost.get("watts_by_rows") or []
        lines.append(f"  {name:<18}{' '.join(f'{x:.1f}' for x in table[:16])}; "
                     f"switch {cost.get('switch_ms', 0):.2f}")
        if watts:
            lines.append(f"  {'':<18}{' '.join(f'{x:.1f}' for x in watts[:16])} W")
    return "\n".join(lines)


def median_ratios(runs: dict[str, list[dict[str, Any]]], clients: list[int]) -> list[str]:
    """Per level, the median over rounds of each round's routed / baseline device joules (the
    policies of one round ran minutes apart at most, so a round's ratio is side by side), and
    of budgets met by policy."""
    lines = ["median of rounds (device J ratio; budgets met routed / always-full / static):"]
    for n in clients:
        r, a, st = (runs[f"{p} @{n}"] for p in POLICIES)
        def ratio(base: list[dict[str, Any]], r: list[dict[str, Any]] = r) -> float:
            return statistics.median(x["device_joules"] / y["device_joules"]
                                     for x, y in zip(r, base, strict=True))

        full, stat = ratio(a), ratio(st)
        met = [100 * statistics.median(x["budgets_met"] for x in rs) for rs in (r, a, st)]
        lines.append(f"  {n:>2} clients: routed/always-full {full:.2f}, routed/static "
                     f"{stat:.2f}; budgets met {met[0]:.1f} / {met[1]:.1f} / {met[2]:.1f} % "
                     f"({len(r)} rounds)")
    return lines


def run_scaling(ladder: Path, threads: int = 2, requests: int = 48, new_tokens: int = 64,
                clients: int = 16) -> dict[str, Any]:
    """``full`` alone: the same greedy requests from 1 client, then from ``clients``."""
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    reqs = [{"id": i, "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
             "latency_ms": 600_000.0, "min_quality": 1.0} for i in range(requests)]
    env = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64"}
    out: dict[str, Any] = {"requests": requests, "new_tokens": new_tokens}
    with live_service(ladder, env) as c:
        quality = {v["name"]: v["quality"] for v in c.get("/v1/variants").json()["data"]}
        for n in (1, clients):
            r = measured(c, reqs, lambda _r: "full", n, quality)
            r["tok_s"] = r["tokens"] / r["wall_s"]
            out[f"@{n}"] = r
    one, many = out["@1"], out[f"@{clients}"]
    out["speedup"] = many["tok_s"] / one["tok_s"]
    out["identical_text"] = one["texts"] == many["texts"]
    return out


def report_scaling(f: dict[str, Any]) -> str:
    lines = [f"full alone, {f['requests']} greedy requests of up to {f['new_tokens']} tokens"]
    for key in (k for k in f if k.startswith("@")):
        r = f[key]
        lines.append(f"  {key:>4} clients: {r['tok_s']:.1f} tok/s; ledger {r['ledger_joules']:.1f}"
                     f" J, device {r['device_joules']:.1f} J (ratio {r['ledger_over_device']:.3f})"
                     f", busy {r['busy_joules']:.1f} J (ledger/busy {r['ledger_over_busy']:.3f})")
    lines.append(f"  speedup {f['speedup']:.2f}x (target >= 4); identical greedy text: "
                 f"{f['identical_text']}")
    return "\n".join(lines)
