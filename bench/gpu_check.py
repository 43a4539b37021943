"""``greenroute bench gpu-check``: the GPU path end to end, in one command, on a machine with an
NVIDIA GPU (under 8 minutes with a built ladder; the build adds its own time), one table out.

1. **Ladder**: ``--ladder`` when it holds a built ladder, else ``greenroute build --out`` (the
   recorded build decisions: no races) into ``--out``. The same ONNX graphs serve on the CUDA
   execution provider; nothing is GPU-specific in the files.
2. **Serve** it: ``greenroute serve`` with ``GREENROUTE_DEVICE=cuda`` (``--device``) and the NVML
   meter, and check that ``/v1/variants`` says the meter is NVML.
3. **Meters agree**: while the service generates (8 clients on ``full``), NVML's energy counter
   and integrated ``nvmlDeviceGetPowerUsage`` samples (100 Hz) read the same windows, in this
   process; the median ratio samples / counter within 5 % (:data:`AGREEMENT`).
4. **Batching scales**: ``full`` at 1, 4 and 16 clients (64 greedy tokens each, EOS ignored):
   tok/s and joules per generated token from the answers; over the three, the answers' joules
   against the service's busy joules, read once its lane is idle (conservation, within 5 %).
5. **Routing**: the route bench's chat workload (its first ``--requests``) routed and pinned to
   ``full``, taking turns, at 1 and 8 clients: device joules routed / always-``full``,
   budgets met, the mix.

Exit status 1 when a check fails (the meters disagree, the service did not use NVML or the GPU,
joules do not add up within 5 %, or the check overran its time); run here (no GPU) its tests
drive it on the tiny ladder against a fake pynvml module, the same boundary the unit tests fake.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.energy import meters_agree
from bench.live import live_service
from bench.route import WORKLOAD, device_joules, measured

AGREEMENT = 0.05  # counter vs integrated samples
CONSERVATION = 0.05  # the answers' joules vs the service's busy joules
TIME_LIMIT_S = 480.0  # serving and measuring (the 8 minutes); a build is reported apart
CLIENTS = (1, 4, 16)
ROUTE_CLIENTS = (1, 8)
PROMPTS = ["The json module", "Return a new list", "Raise ValueError if",
           "A context manager is", "Use the logging module to", "This function returns the"]


def _ladder(ladder: Path | None, out: Path) -> tuple[Path, float]:
    """A built ladder and the seconds its build took (0: given)."""
    if ladder is not None and (ladder / "manifest.json").is_file():
        return ladder, 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", "build", "--out", str(out)], check=True)
    return out, time.perf_counter() - t0


def _generate(c: httpx.Client, clients: int, requests: int, new_tokens: int) -> dict[str, Any]:
    """``requests`` greedy requests on ``full`` from ``clients`` closed-loop clients."""
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": new_tokens,
               "variant": "full", "ignore_eos": True} for i in range(requests)]
    t0 = time.perf_counter()

    def one(body: dict[str, Any]) -> dict[str, Any]:
        with httpx.Client(base_url=str(c.base_url), timeout=600) as mine:
            r = mine.post("/v1/generate", json=body)
            r.raise_for_status()
            return r.json()  # type: ignore[no-any-return]

    with cf.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    joules = sum(d["energy"]["joules"] for d in done)
    return {"clients": clients, "tokens_per_s": tokens / wall, "joules_per_token": joules / tokens,
            "joules": joules, "wall_s": wall,
            "sources": sorted({d["energy"]["source"] for d in done})}


def _busy_when_idle(c: httpx.Client, timeout_s: float = 5.0) -> float:
    """The service's busy joules once its lane has gone idle (the last interval settled)."""
    last, deadline = -1.0, time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        busy = device_joules(c)["device_busy_energy"]
        if busy == last:
            break
        last = busy
        time.sleep(0.3)
    return last


def run_check(ladder: Path | None, out: Path, device: str = "cuda", threads: int = 2,
              requests: int = 24, agreement_runs: int = 3) -> dict[str, Any]:
    path, build_s = _ladder(ladder, out)
    reqs = [json.loads(line) for line in WORKLOAD.read_text().splitlines() if line.strip()]
    reqs = reqs[:requests]
    env = {"GREENROUTE_DEVICE": device, "GREENROUTE_ENERGY_METER": "nvml",
           "GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64"}
    t0 = time.perf_counter()
    with live_service(path, env, ready_timeout_s=300.0) as c:
        variants = c.get("/v1/variants").json()
        meter = variants["energy_meter"]
        loaded = [v for v in variants["data"] if v["loaded"]]
        served_on = sorted({(v.get("execution") or {}).get("device", "?") for v in loaded})
        agreement = meters_agree(lambda: _generate(c, 8, 8, 64), agreement_runs)
        busy0 = _busy_when_idle(c)
        scaling = [_generate(c, n, 2 * n, 64) for n in CLIENTS]
        busy = _busy_when_idle(c) - busy0
        answers = sum(s["joules"] for s in scaling)
        conserved = answers / busy if busy > 0 else float("nan")
        quality = {v["name"]: v["quality"] for v in loaded}
        routing = {}
        for n in ROUTE_CLIENTS:
            routed = measured(c, reqs, lambda r: "auto", n, quality)
            full = measured(c, reqs, lambda r: "full", n, quality)
            routing[n] = {"routed_over_full": routed["device_joules"] / full["device_joules"]
                          if full["device_joules"] else None,
                          "budgets_met": (routed["budgets_met"], full["budgets_met"]),
                          "mix": routed["mix"]}
    seconds = time.perf_counter() - t0
    ratio = agreement["median_ratio"]
    checks = {
        "meter is NVML": meter["source"] == "nvml",
        f"every rung served on {device}": served_on == [device],
        f"counter vs samples within {AGREEMENT:.0%}": abs(ratio - 1) <= AGREEMENT,
        f"answers' joules = busy joules within {CONSERVATION:.0%}":
            abs(conserved - 1) <= CONSERVATION,
        f"under {TIME_LIMIT_S / 60:.0f} min (build apart)": seconds <= TIME_LIMIT_S,
    }
    return {"ladder": str(path), "build_s": build_s, "seconds": seconds, "device": device,
            "served_on": served_on,
            "gpu": agreement["gpu"], "meter": meter, "agreement": agreement,
            "answers_over_busy": conserved,
            "scaling": scaling, "routing": routing, "checks": checks,
            "ok": all(checks.values())}


def report(f: dict[str, Any]) -> str:
    a = f["agreement"]
    lines = [f"gpu-check on {f['gpu']} ({f['device']}), ladder {f['ladder']}"
             + (f" (built in {f['build_s']:.0f} s)" if f["build_s"] else "")
             + f"; serving and measuring {f['seconds']:.0f} s",
             f"{'part':<34}{'figure':>40}"]
    lines.append(f"{'NVML counter vs 100 Hz samples':<34}"
                 f"{'median ratio ' + format(a['median_ratio'], '.3f'):>40}")
    for s in f["scaling"]:
        figure = f"{s['tokens_per_s']:.1f} tok/s, {s['joules_per_token']:.4f} J/tok"
        lines.append(f"{'full, ' + str(s['clients']) + ' clients':<34}{figure:>40}")
    lines.append(f"{'answers / busy joules (1-16 clients)':<34}"
                 f"{format(f['answers_over_busy'], '.3f'):>40}")
    for n, r in f["routing"].items():
        met = "/".join(f"{100 * x:.0f}%" for x in r["budgets_met"])
        figure = f"routed/full {r['routed_over_full'] or float('nan'):.2f}, budgets {met}"
        lines.append(f"{'routing, ' + str(n) + ' clients':<34}{figure:>40}")
    lines += [f"  {'ok ' if ok else 'FAILED'} {name}" for name, ok in f["checks"].items()]
    return "\n".join(lines)
