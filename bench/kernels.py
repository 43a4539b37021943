"""``greenroute bench kernels``: greenroute's ``RowQuantMatMul`` (int8 weights; activations at
8 bits, and at 16 as the ``a16`` ladder candidates use it) against onnxruntime's fp32 ``MatMul``
and 8-bit ``MatMulNBits`` (block 64, ``accuracy_level=4``: int8 compute) on one matrix, at one
row and at many, taking turns round by round.

Each of our instruction-set paths this CPU has runs in a child process of its own (the library
picks its path once per process; ``GREENROUTE_KERNEL_ISA`` forces a lesser one), and times the
two onnxruntime operators beside it in the same rounds. Medians of ``rounds`` rounds, each the
mean of enough calls for about 20 ms, in microseconds per call including onnxruntime's
``run`` overhead (a few µs, the same for all three).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.runtime import kernels
from models.runtime.host import cpu_name, isa_flags

ROOT = Path(__file__).resolve().parents[1]


def _sessions(k: int, n: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from models.build.pipeline.rowquant import levels_for, pack_weight

    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def model(nodes: list[Any], inits: list[Any], ours: bool = False) -> Any:
        graph = helper.make_graph(nodes, "g", [x_in], [y_out], inits)
        ops = [helper.make_opsetid("", 17)]
        return helper.make_model(graph, opset_imports=ops + (
            [helper.make_opsetid(kernels.DOMAIN, 1)] if ours else []))

    fp32 = model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [numpy_helper.from_array(w, "w")])
    quantizer = MatMulNBitsQuantizer(model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                           [numpy_helper.from_array(w, "w")]),
                                     bits=8, block_size=64, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    q, scale, sums = pack_weight(w)

    def ours(bits: int) -> Any:
        return model([helper.make_node(kernels.OP_ROW_QUANT, ["x", "w", "s", "sums"], ["y"],
                                       domain=kernels.DOMAIN, levels=levels_for(k, bits))],
                     [numpy_helper.from_array(a, name)
                      for a, name in ((q, "w"), (scale, "s"), (sums, "sums"))], ours=True)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.require(so, "bench kernels")
    return {name: ort.InferenceSession(m.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
            for name, m in (("fp32", fp32), ("nbits8", quantizer.model.model),
                            ("rowquant", ours(8)), ("rowquant-a16", ours(16)))}


def measure(k: int, n: int, rows: list[int], rounds: int, threads: int) -> dict[str, Any]:
    """In this process: µs per call of each operator at each row count (medians)."""
    sessions = _sessions(k, n, threads)
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"isa": kernels.active_isa(), "us": {}}
    for m in rows:
        x = {"x": rng.normal(size=(m, k)).astype(np.float32)}
        calls = {}
        for name, sess in sessions.items():  # warm up, and size each round to ~20 ms
            sess.run(None, x)
            t = time.perf_counter()
            sess.run(None, x)
            calls[name] = max(3, int(0.02 / max(time.perf_counter() - t, 1e-6)))
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, sess in sessions.items():
                t = time.perf_counter()
                for _ in range(calls[name]):
                    sess.run(None, x)
                times[name].append((time.perf_counter() - t) / calls[name] * 1e6)
        out["us"][str(m)] = {name: statistics.median(v) for name, v in times.items()}
    return out


def isa_paths() -> list[str]:
    """Our paths this CPU can run, best last."""
    have = set(isa_flags())
    paths = ["avx2"] if "avx2" in have else ["scalar"]
    paths += ["avxvnni"] if "avx_vnni" in have else []
    paths += ["avx512vnni"] if {"avx512_vnni", "avx512bw"} <= have else []
    return paths


def run_bench(k: int = 576, n: int = 1536, rows: tuple[int, ...] = (1, 16), rounds: int = 7,
              threads: int = 1) -> dict[str, Any]:
    import onnxruntime

    if not kernels.available():
        raise SystemExit("greenroute's kernels are not built: run `make kernels`")
    figures: dict[str, Any] = {
        "k": k, "n": n, "rows": list(rows), "rounds": rounds, "threads": threads,
        "cpu": cpu_name(), "isa_flags": isa_flags(), "onnxruntime": onnxruntime.__version__,
        "paths": {}}
    code = ("import json, sys; from bench.kernels import measure; "
            f"print(json.dumps(measure({k}, {n}, {list(rows)}, {rounds}, {threads})))")
    for isa in isa_paths():
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, check=False,
                              env={**os.environ, "GREENROUTE_KERNEL_ISA": isa})
        if done.returncode != 0:
            raise SystemExit(f"bench kernels ({isa}) failed: {done.stderr[-1000:]}")
        figures["paths"][isa] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def report(f: dict[str, Any]) -> str:
    lines = [f"RowQuantMatMul vs onnxruntime {f['onnxruntime']}, K={f['k']} N={f['n']}, "
             f"{f['threads']} thread(s), median of {f['rounds']} rounds taking turns (µs/call)",
             f"CPU: {f['cpu']} ({' '.join(f['isa_flags'])})",
             "| our path | rows | fp32 MatMul | MatMulNBits 8-bit | ours, a8 | ours, a16 | "
             "a8 / fp32 | a8 / NBits | a16 / fp32 | a16 / NBits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in f["paths"].values():
        for m, us in r["us"].items():
            a8, a16 = us["rowquant"], us["rowquant-a16"]
            lines.append(f"| {r['isa']} | {m} | {us['fp32']:.1f} | {us['nbits8']:.1f} | "
                         f"{a8:.1f} | {a16:.1f} | {a8 / us['fp32']:.2f} | "
                         f"{a8 / us['nbits8']:.2f} | {a16 / us['fp32']:.2f} | "
                         f"{a16 / us['nbits8']:.2f} |")
    return "\n".join(lines)
