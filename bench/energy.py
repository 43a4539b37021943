"""``greenroute bench energy``: what metering costs, and (on a GPU) whether meters agree.

1. Overhead: the median cost of one request window (``begin`` + ``end``) for every meter that
   opens on this host, in µs, next to the median request it would wrap (the default ladder's
   ``distilled-int8``, 16 new tokens) as a fraction.
2. Agreement (NVML GPUs with the energy counter only): the same generations measured at once by
   the counter and by integrated ``nvmlDeviceGetPowerUsage`` samples; per-run ratio.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetry.base import EnergyMeter, MeterUnavailableError
from telemetry.estimate import EstimateMeter
from telemetry.nvml import NvmlMeter
from telemetry.rapl import RaplMeter


def _fake_powercap(root: Path) -> Path:
    """One package and its dram zone, as the kernel lays them out (for our code's cost when the
    host has no readable RAPL; a real sysfs read costs more than a tmpfs one)."""
    for zone, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:1", "dram")):
        (root / zone).mkdir(parents=True)
        (root / zone / "name").write_text(name)
        (root / zone / "energy_uj").write_text("1000")
        (root / zone / "max_energy_range_uj").write_text("262143328850")
    return root


def _meters(tmp: Path) -> tuple[dict[str, EnergyMeter], dict[str, str]]:
    meters: dict[str, EnergyMeter] = {"estimate": EstimateMeter()}
    absent: dict[str, str] = {}
    for name, make in (("rapl", RaplMeter), ("nvml", NvmlMeter)):
        try:
            meters[name] = make()
        except MeterUnavailableError as err:
            absent[name] = str(err)
    if "rapl" in absent:
        meters["rapl (fake tree)"] = RaplMeter(_fake_powercap(tmp / "powercap"))
    return meters, absent


def window_cost_us(meter: EnergyMeter, windows: int = 2000, batches: int = 9) -> float:
    """Median over batches of the mean µs per begin/end pair."""
    per_batch = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(windows):
            meter.end(meter.begin())
        per_batch.append(1e6 * (time.perf_counter() - t) / windows)
    return statistics.median(per_batch)


def _request_ms(ladder: Path, variant: str, threads: int, runs: int = 9) -> float | None:
    from models.runtime.engine.base import GenerationParams
    from models.runtime.ladder import load_ladder

    try:
        engine = load_ladder(ladder, threads=threads, only=[variant]).engines[variant]
    except Exception:  # no ladder built: report overhead alone
        return None
    params = GenerationParams(max_new_tokens=16)
    engine.generate("The json module", params)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        engine.generate("The json module", params)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def meters_agree(work: Callable[[], object], runs: int) -> dict[str, Any]:
    """NVML's counter and integrated 100 Hz power samples over the same ``runs`` windows of
    ``work``: each run's joules on both and their ratio, and the median ratio."""
    counter = NvmlMeter(mode="counter", counter_period_s=0.0)
    sampled = NvmlMeter(mode="sampling", sample_hz=100)
    try:
        rows = []
        for _ in range(runs):
            a, b = counter.begin(), sampled.begin()
            work()
            rc, rs = counter.end(a), sampled.end(b)
            rows.append({"seconds": rc.seconds, "counter_j": rc.joules, "samples_j": rs.joules,
                         "ratio": rs.joules / rc.joules if rc.joules else float("nan")})
        return {"gpu": counter.gpu_name, "runs": rows,
                "median_ratio": statistics.median(r["ratio"] for r in rows)}
    finally:
        sampled.close()
        counter.close()


def agreement(ladder: Path, runs: int, threads: int) -> dict[str, Any]:
    """Counter vs integrated samples over the same generations (needs a counter GPU)."""
    from models.runtime.engine.base import GenerationParams
    from models.runtime.ladder import load_ladder

    try:
        NvmlMeter(mode="counter", counter_period_s=0.0).close()
    except MeterUnavailableError as err:
        return {"skipped": f"no NVML energy counter here ({err})"}
    engine = load_ladder(ladder, device="cuda", threads=threads, only=["full"]).engines["full"]
    params = GenerationParams(max_new_tokens=256)
    engine.generate("The json module", params)
    return meters_agree(lambda: engine.generate("The json module", params), runs)


def run_bench(ladder: Path, variant: str = "distilled-int8", threads: int = 2,
              gpu_runs: int = 5) -> dict[str, Any]:
    request_ms = _request_ms(ladder, variant, threads)
    overhead = {}
    with tempfile.TemporaryDirectory() as tmp:
        meters, absent = _meters(Path(tmp))
        for name, meter in meters.items():
            us = window_cost_us(meter)
            overhead[name] = {"window_us": us, "device": meter.device,
                              "fraction_of_request": us / 1000 / request_ms if request_ms
                              else None}
            meter.close()
    return {"overhead": overhead, "absent": absent, "request_ms": request_ms,
            "request_variant": variant, "agreement": agreement(ladder, gpu_runs, threads)}


def report(f: dict[str, Any]) -> str:
    lines = ["meter overhead per request window (begin + end, median of 9 x 2000):"]
    if f["request_ms"]:
        lines.append(f"  wrapped request: {f['request_variant']}, 16 new tokens, median "
                     f"{f['request_ms']:.1f} ms")
    for name, o in f["overhead"].items():
        frac = (f"  = {100 * o['fraction_of_request']:.4f} % of the request"
                if o["fraction_of_request"] is not None else "")
        lines.append(f"  {name:<16} ({o['device']}) {o['window_us']:8.2f} us{frac}")
    for name, why in f["absent"].items():
        lines.append(f"  {name:<16} not measured: {why}")
    a = f["agreement"]
    if "skipped" in a:
        lines.append(f"counter vs power samples: skipped: {a['skipped']}")
    else:
        lines.append(f"counter vs power samples on {a['gpu']} ({len(a['runs'])} runs of 256 "
                     f"tokens): median samples/counter = {a['median_ratio']:.3f}")
        for r in a["runs"]:
            lines.append(f"  {r['seconds']:.2f} s: counter {r['counter_j']:.2f} J, "
                         f"samples {r['samples_j']:.2f} J, ratio {r['ratio']:.3f}")
    return "\n".join(lines)
