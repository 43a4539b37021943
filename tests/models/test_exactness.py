"""The race's exactness check (models.build.pipeline.exactness) on real onnxruntime sessions:
integer kernels against numpy's int64 product on adversarial rows, on this CPU and on an
AVX2-only CPU emulated by qemu (where full-range int8 weights saturate), and logits against the
fp32 source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

from models.build.pipeline.exactness import check_candidate, integer_kernel_errors
from models.build.pipeline.quantize import CANDIDATES_8BIT, QuantMethod, quantize
from models.runtime import kernels
from models.runtime.engine.ort import OrtEngine
from models.runtime.host import isa_summary

ROOT = Path(__file__).resolve().parents[2]
# AMD EPYC Zen 3 (Milan): AVX2 and FMA, no AVX-512, VNNI or AMX: today's build machines
AVX2_ONLY_CPU = "EPYC-Milan"


def matmul_model(w: np.ndarray, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="l/q_proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", w.shape[1]])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def adversarial_weights(k: int = 96, n: int = 40) -> np.ndarray:
    """Columns of equal magnitude (every weight quantizes to ±max), mixed signs."""
    rng = np.random.default_rng(5)
    return (rng.choice([-1.0, 1.0], size=(k, n)) * rng.uniform(0.5, 2, n)).astype(np.float32)


def full_range_matmul_integer(k: int = 64, n: int = 16) -> onnx.ModelProto:
    """A u8s8 ``MatMulInteger`` with weights at +127 (the control: AVX2 without VNNI saturates)."""
    w = np.full((k, n), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "zp"], ["y"], name="full_range")], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("method", [m for m in CANDIDATES_8BIT if m.family in ("w8a8", "dynamic")],
                         ids=lambda m: m.name)
def test_the_integer_families_are_exact_here(method: QuantMethod, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    onnx.save(matmul_model(adversarial_weights()), str(tmp_path / "src" / "model.onnx"))
    out = quantize(tmp_path / "src", tmp_path / "q", method)
    graph = onnx.load(str(out))
    assert any(n.op_type == "MatMulInteger" for n in graph.graph.node)
    w = next(numpy_helper.to_array(t) for t in graph.graph.initializer
             if t.data_type == TensorProto.INT8)
    assert np.abs(w.astype(np.int16)).max() <= 64  # 7 bits: no u8 x s8 pair can saturate
    assert integer_kernel_errors(out) == [], isa_summary()


AVX2_SCRIPT = """
import sys
from pathlib import Path
import onnx
from models.build.pipeline.exactness import integer_kernel_errors
from tests.models.test_exactness import full_range_matmul_integer
control = integer_kernel_errors(full_range_matmul_integer())
fixed = {p: integer_kernel_errors(Path(p)) for p in sys.argv[1:]}
print(repr((control, fixed)))
"""


def test_the_integer_families_are_exact_on_an_avx2_only_cpu(tmp_path: Path) -> None:
    """The same check under qemu's model of today's AMD EPYC (AVX2, no VNNI): full-range int8
    weights give wrong sums there (the control), the families' 7-bit weights do not. Runs
    whatever CPU the host has, so a VNNI machine cannot hide the AVX2 bug."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: `make system-deps` installs qemu-user")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user)")
    (tmp_path / "src").mkdir()
    onnx.save(matmul_model(adversarial_weights()), str(tmp_path / "src" / "model.onnx"))
    graphs = [str(quantize(tmp_path / "src", tmp_path / m.name, m)) for m in CANDIDATES_8BIT
              if m.family in ("w8a8", "dynamic")]
    done = subprocess.run([qemu, "-cpu", AVX2_ONLY_CPU, sys.executable, "-c", AVX2_SCRIPT,
                           *graphs], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=True)
    control, fixed = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert control and control[0].startswith("full_range: "), "the emulated CPU did not saturate"
    assert fixed == {g: [] for g in graphs}


def test_the_check_rejects_a_wrong_scale_and_passes_a_sound_copy(
        random_llama_builder: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, src = random_llama_builder
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ref = OrtEngine(src / "model.onnx", tok, 128, [0])
    prompts = [ref.encode("The json module can"), ref.encode("def main():\n    return 1")]
    method = next(m for m in CANDIDATES_8BIT if m.family == "w8a8")
    good = quantize(src, tmp_path / "good", method)
    record = check_candidate(good, OrtEngine(good, tok, 128, [0]), ref, prompts)
    assert record["ok"] and record["integer_kernels"] == "exact", record
    # the same graph with its weight scales shuffled across output channels: what a kernel that
    # mixed up columns (or a packing bug) would compute
    bad_model = onnx.load(str(good))
    rng = np.random.default_rng(0)
    for t in bad_model.graph.initializer:
        if t.name.endswith("_w8_scale"):
            t.CopyFrom(numpy_helper.from_array(rng.permutation(numpy_helper.to_array(t)), t.name))
    shutil.copytree(good.parent, tmp_path / "bad")
    bad = tmp_path / "bad" / "model.onnx"
    onnx.save(bad_model, str(bad))
    record = check_candidate(bad, OrtEngine(bad, tok, 128, [0]), ref, prompts)
    assert not record["ok"] and "greedy tokens agree" in str(record["reason"]), record


@pytest.mark.skipif(kernels.active_isa() not in ("avxvnni", "avx512vnni"),
                    reason="only the VNNI paths read the weight sums")
def test_greenroutes_operator_is_checked_bit_for_bit() -> None:
    """Each RowQuantMatMul runs alone against its numpy reference: sound, it passes; with one
    weight sum off by one (the VNNI paths' offset correction), the node is named."""
    from models.build.pipeline.rowquant import rowquant_graph
    from tests.models.test_rowquant import mlp_model

    model = mlp_model()
    rowquant_graph(model)
    assert integer_kernel_errors(model) == []
    sums = next(t for t in model.graph.initializer if t.name.endswith("/sums"))
    wrong = numpy_helper.to_array(sums).copy()
    wrong[0] += 1
    sums.CopyFrom(numpy_helper.from_array(wrong, sums.name))
    errors = integer_kernel_errors(model)
    assert len(errors) == 1 and errors[0].startswith("mlp/gate_proj/MatMul_rowquant: ")
