"""Our NVML meter on a real GPU: the energy counter against integrated power samples over the
same windows, and the cost of one request window, under a GPU load made with torch (so it runs
on a GPU host that has torch but not our ladder or onnxruntime-gpu).

``python -m bench.nvml_gpu [--runs 5] [--seconds 1.0]`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from telemetry.nvml import NvmlMeter


def _load(seconds: float) -> None:
    """Keep the GPU busy with bf16 matrix products for about ``seconds``."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a = (a @ b) * 1e-2
        torch.cuda.synchronize()


def run(runs: int, seconds: float) -> dict[str, Any]:
    counter = NvmlMeter(mode="counter", counter_period_s=0.0)
    sampled = NvmlMeter(mode="sampling", sample_hz=100)
    try:
        _load(0.5)  # warm-up: clocks up, kernels loaded
        rows = []
        for _ in range(runs):
            a, b = counter.begin(), sampled.begin()
            _load(seconds)
            rc, rs = counter.end(a), sampled.end(b)
            rows.append({"seconds": round(rc.seconds, 3), "counter_j": round(rc.joules, 2),
                         "samples_j": round(rs.joules, 2), "watts": round(rc.avg_watts, 1),
                         "ratio": round(rs.joules / rc.joules, 4) if rc.joules else None})
        t = time.perf_counter()
        for _ in range(1000):
            counter.end(counter.begin())
        window_us = 1e6 * (time.perf_counter() - t) / 1000
        idle = counter.begin()
        time.sleep(1.0)
        idle_reading = counter.end(idle)
        return {"gpu": counter.gpu_name, "runs": rows,
                "median_ratio_samples_over_counter": statistics.median(
                    r["ratio"] for r in rows if r["ratio"]),
                "counter_window_cost_us": round(window_us, 1),
                "idle_watts": round(idle_reading.avg_watts, 1), "source": idle_reading.source}
    finally:
        sampled.close()
        counter.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.nvml_gpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(run(args.runs, args.seconds), indent=2))


if __name__ == "__main__":
    main()
