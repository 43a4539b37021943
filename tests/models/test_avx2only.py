"""kernels/avx2only (a CPUID mask loaded with LD_PRELOAD): with it, every library in the process
takes the code path it takes on an AVX2-only CPU — onnxruntime's MLAS (shown by the one
computation that differs: a full-range u8s8 ``MatMulInteger`` saturates without VNNI), numpy,
greenroute's kernels — and models.runtime.host reports the mask. Where the CPU has no CPUID
faulting the tool refuses to run rather than measure the wrong thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.runtime import kernels
from models.runtime.host import _cpuinfo

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "kernels" / "build" / "libavx2only.so"

PROBE = """
import json, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from numpy._core._multiarray_umath import __cpu_features__ as feats
from models.runtime import host, kernels
k, n = 64, 16
w = np.full((k, n), 127, np.int8)
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "w", "zp"], ["y"])], "g",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
    [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "zp")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
a = np.full((4, k), 255, np.uint8)
got = sess.run(None, {"a": a})[0].astype(np.int64)
want = (a.astype(np.int64) - 128) @ w.astype(np.int64)
print(json.dumps({"isa": host.isa_flags(), "summary": host.isa_summary(),
                  "numpy_avx512f": bool(feats.get("AVX512F")),
                  "kernel": kernels.active_isa() if kernels.library_path() else None,
                  "saturated": bool((got != want).any())}))
"""


def run_masked() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LD_PRELOAD": str(LIB), "PYTHONPATH": str(ROOT)}
    env.pop("GREENROUTE_KERNEL_ISA", None)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def flags() -> set[str]:
    if not LIB.exists():
        pytest.skip(f"{LIB.relative_to(ROOT)} not built (make kernels)")
    return set(_cpuinfo().get("flags", "").split())


def test_without_cpuid_faulting_it_refuses_to_run(flags: set[str]) -> None:
    if "cpuid_fault" in flags:
        pytest.skip("this CPU has CPUID faulting: the mask works here (the next test)")
    out = run_masked()
    assert out.returncode == 97 and "no CPUID faulting" in out.stderr


def test_everything_takes_its_avx2_path_under_the_mask(flags: set[str]) -> None:
    if "cpuid_fault" not in flags:
        pytest.skip("no CPUID faulting on this CPU (the previous test)")
    if not {"avx2", "fma"} <= flags:
        pytest.skip("not an AVX2 CPU")
    out = run_masked()
    assert out.returncode == 0, out.stderr
    assert "CPUID masked" in out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["isa"] == ["avx2", "fma"]
    assert not seen["numpy_avx512f"]
    if kernels.library_path():
        assert seen["kernel"] == "avx2"
    # onnxruntime's u8s8 kernel without VNNI adds u8 x s8 pairs in int16 and saturates at 127
    assert seen["saturated"], "onnxruntime still took a VNNI kernel: the mask did not reach MLAS"
    hidden = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    if hidden:
        assert "hidden by the avx2only CPUID mask" in seen["summary"]
        assert all(f in seen["summary"] for f in hidden)
