"""``greenroute bench threads``: each variant's decode on one thread against ``threads``.

Per variant, two sessions of the same graph (one thread; ``threads``), taking turns round by
round on the same prompt: median milliseconds and joules per decoded token (batch 1), from the
energy meter the service would open here (on a host without RAPL or NVML, the estimate: CPU
time × watts per core, so a second thread that mostly waits on memory costs what it spins).
This is what ``GREENROUTE_VARIANT_THREADS`` trades: latency for energy per rung.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.slots import KVSlots, Sampler
from models.runtime.ladder import load_ladder
from models.runtime.manifest import Manifest
from telemetry.factory import MeterConfig, create_meter


def run_bench(ladder: Path, threads: int = 2, new_tokens: int = 64, rounds: int = 5,
              variants: list[str] | None = None) -> dict[str, Any]:
    manifest = Manifest.load(ladder)
    names = variants or [v.name for v in manifest.ordered() if v.speculative is None]
    meter = create_meter(MeterConfig("auto", "cpu"))
    out: dict[str, Any] = {"threads": threads, "new_tokens": new_tokens, "rounds": rounds,
                           "energy_source": meter.source, "variants": {}}
    counts = (1, threads)
    for name in names:
        slots: dict[int, KVSlots] = {}
        for t in counts:
            engine = load_ladder(ladder, threads=t, runtime="onnxruntime", only=[name],
                                 warmup=False).engines.get(name)
            if not isinstance(engine, OrtEngine) or not engine.shared_kv:
                break
            slots[t] = KVSlots(engine, 1, 64 + new_tokens + 1)
        if len(slots) < len(counts):
            continue
        prompt = slots[1].engine.encode("The json module provides functions to encode and")
        sampler = Sampler(GenerationParams(max_new_tokens=new_tokens))
        ms: dict[int, list[float]] = {t: [] for t in counts}
        joules: dict[int, list[float]] = {t: [] for t in counts}
        for r in range(rounds + 1):  # the first round warms both up and is not counted
            for t in counts if r % 2 else counts[::-1]:
                s = slots[t]
                token = s.prefill(0, prompt, sampler)
                mark, start = meter.begin(), time.perf_counter()
                for _ in range(new_tokens - 1):
                    token = s.step([0], [token], [sampler])[0]
                seconds, reading = time.perf_counter() - start, meter.end(mark)
                s.release(0)
                if r:
                    ms[t].append(1000 * seconds / (new_tokens - 1))
                    joules[t].append(reading.joules / (new_tokens - 1))
        out["variants"][name] = {str(t): {"ms_per_token": statistics.median(ms[t]),
                                          "joules_per_token": statistics.median(joules[t])}
                                 for t in counts}
    meter.close()
    return out


def report(f: dict[str, Any]) -> str:
    t = str(f["threads"])
    lines = [f"decode at batch 1, {f['new_tokens']} tokens, {f['rounds']} rounds taking turns; "
             f"energy source {f['energy_source']}",
             f"{'variant':<16}{'ms/tok 1':>10}{'ms/tok ' + t:>10}{'J/tok 1':>10}"
             f"{'J/tok ' + t:>10}{'time 1/' + t:>10}{'J 1/' + t:>9}"]
    for name, v in f["variants"].items():
        one, many = v["1"], v[t]
        lines.append(f"{name:<16}{one['ms_per_token']:>10.2f}{many['ms_per_token']:>10.2f}"
                     f"{one['joules_per_token']:>10.4f}{many['joules_per_token']:>10.4f}"
                     f"{one['ms_per_token'] / many['ms_per_token']:>10.2f}"
                     f"{one['joules_per_token'] / max(1e-12, many['joules_per_token']):>9.2f}")
    return "\n".join(lines)
