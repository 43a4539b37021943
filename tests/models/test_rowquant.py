"""greenroute's own batched 8-bit operator (kernels/rowquant.cc, models/build/pipeline/rowquant.py)
on real onnxruntime sessions: every instruction-set path this CPU has (and AVX2 on an emulated
AVX2-only CPU) against the numpy reference exactly, on random and adversarial (±127) inputs, the
default model's shapes and odd ones, M = 1..17; rows independent of each other; the graph
rewrite; and the tiny Llama's greedy text identical alone and in a batch of 16."""

from __future__ import annotations

import json
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

from models.build.pipeline.quantize import (
    CANDIDATE_ROWQUANT,
    CANDIDATE_ROWQUANT_A16,
    QuantMethod,
    quantize,
)
from models.build.pipeline.rowquant import levels_for, pack_weight, rowquant_graph
from models.runtime import kernels
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.offline import generate_many
from models.runtime.engine.ort import OrtEngine
from models.runtime.host import isa_flags, isa_summary

ROOT = Path(__file__).resolve().parents[2]
AVX2_ONLY_CPU = "EPYC-Milan"  # qemu's AMD EPYC Zen 3: AVX2 and FMA, no AVX-512, VNNI or AMX

pytestmark = pytest.mark.skipif(
    not kernels.available() and not os.environ.get("CI"),
    reason="greenroute's kernels are not built (make kernels)")

# (K, output widths): the default model's projections (q/k/v fused, gate+up fused, o, down),
# then odd shapes: K not a multiple of 64, widths not multiples of any tile
SHAPES = [(576, [960]), (576, [1536, 1536]), (576, [576]), (1536, [576]), (172, [7, 13]),
          (64, [1, 3]), (100, [65])]


def op_model(ws: list[np.ndarray], levels: int = 127
             ) -> tuple[onnx.ModelProto, list[tuple[np.ndarray, ...]]]:
    """One ``RowQuantMatMul`` over ``ws`` (all [K, n_i]), one output each."""
    parts = [pack_weight(w) for w in ws]
    k = ws[0].shape[0]
    node = helper.make_node(
        "RowQuantMatMul", ["x", "w", "s", "sums"], [f"y{i}" for i in range(len(ws))],
        domain=kernels.DOMAIN, splits=[p[0].shape[0] for p in parts], levels=levels)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(ws))],
        [numpy_helper.from_array(np.concatenate([p[i] for p in parts]), n)
         for i, n in enumerate(("w", "s", "sums"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    return model, parts


# Run in a child process per instruction set: the library reads GREENROUTE_KERNEL_ISA once.
CHECK_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
from models.runtime import kernels
from tests.models.test_rowquant import SHAPES, inputs, op_model
from models.build.pipeline.rowquant import levels_for, reference
so = ort.SessionOptions()
so.intra_op_num_threads = 2
kernels.register(so)
bad, checked = [], 0
rng = np.random.default_rng(0)
for k, widths in SHAPES:
  for bits in (8, 16):
    levels = levels_for(k, bits)
    for kind in ("random", "adversarial"):
        ws = [w for w, _ in (inputs(rng, kind, k, n, 1) for n in widths)]
        model, parts = op_model(ws, levels)
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        for m in range(1, 18):
            x = inputs(rng, kind, k, widths[0], m, ws[0])[1]
            for y, p in zip(sess.run(None, {"x": x}), parts):
                checked += 1
                want = reference(x, p[0], p[1], levels)
                if not np.array_equal(y, want):
                    bad.append([k, bits, widths, kind, m, float(np.abs(y - want).max())])
print(json.dumps({"isa": kernels.active_isa(), "checked": checked, "bad": bad[:5]}))
"""


def inputs(rng: np.random.Generator, kind: str, k: int, n: int, m: int,
           w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(w [k, n], x [m, k]). ``adversarial``: every weight and activation quantizes to its
    largest magnitude, the activations' signs those of the first column's weights, so that
    column's sum is the largest the levels allow (int16 pairs of int8 products would saturate;
    at 16 bits, int32 is all but full)."""
    if kind == "random":
        return (rng.normal(size=(k, n)).astype(np.float32),
                (rng.normal(size=(m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32))
    if w is None:
        w = (rng.choice([-1.0, 1.0], size=(k, n)) * rng.uniform(0.5, 2, n)).astype(np.float32)
    x = np.sign(w[:, 0])[None, :] * rng.uniform(1, 3, (m, 1))
    x[1::2] *= -1  # the next row: the largest negative sum
    return w, x.astype(np.float32)


def isa_paths() -> list[str]:
    have = set(isa_flags())
    paths = ["scalar"] + (["avx2"] if "avx2" in have else [])
    paths += ["avxvnni"] if "avx_vnni" in have else []
    paths += ["avx512vnni"] if {"avx512_vnni", "avx512bw"} <= have else []
    return paths


def run_check(env: dict[str, str], prefix: list[str] | None = None) -> dict[str, object]:
    done = subprocess.run([*(prefix or []), sys.executable, "-c", CHECK_SCRIPT], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", isa_paths())
def test_every_path_matches_the_reference_exactly(isa: str) -> None:
    """Bit for bit: integer sums are exact on every path, so only a wrong kernel differs."""
    result = run_check({"GREENROUTE_KERNEL_ISA": isa})
    assert result["isa"] == isa, f"asked for {isa} on {isa_summary()}"
    assert result["checked"] == 2 * 2 * 17 * sum(len(w) for _, w in SHAPES)
    assert result["bad"] == [], result


def test_the_avx2_path_is_exact_on_an_avx2_only_cpu() -> None:
    """The same checks under qemu's model of today's AMD EPYC (AVX2, FMA, no VNNI), whatever
    CPU runs the tests: the library picks its path from that CPU's flags by itself."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: `make system-deps` installs qemu-user")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user)")
    result = run_check({"GREENROUTE_KERNEL_ISA": ""}, [qemu, "-cpu", AVX2_ONLY_CPU])
    assert result["isa"] == "avx2"
    assert result["bad"] == [], result


def test_the_levels_keep_int32_exact() -> None:
    """16-bit activations as fine as int32 sums allow: levels x 127 x Kp < 2^31, the default
    model's K of 576 and 1536 included; the operator refuses a graph past that bound."""
    import onnxruntime as ort

    for k in (64, 576, 1536, 8192, 14336):
        lv, kp = levels_for(k, 16), -(-k // 64) * 64
        assert lv * 127 * kp < 2**31
        assert lv == 32767 or (lv + 1) * 127 * kp >= 2**31  # and no finer level would fit
    assert (levels_for(576, 16), levels_for(1536, 16), levels_for(576, 8)) == (29356, 11008, 127)
    model, _ = op_model([np.ones((1536, 8), np.float32)], levels=12000)
    so = ort.SessionOptions()
    kernels.require(so, "the test graph")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="overflow int32"):
        sess.run(None, {"x": np.ones((1, 1536), np.float32)})


@pytest.mark.parametrize("bits", [8, 16])
def test_a_row_does_not_depend_on_the_rows_beside_it(bits: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.normal(size=(576, 200)).astype(np.float32)
    model, _ = op_model([w], levels_for(576, bits))
    so = ort.SessionOptions()
    kernels.require(so, "the test graph")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    batch = rng.normal(size=(16, 576)).astype(np.float32)
    batch[3] *= 300  # a loud row beside the others
    together = sess.run(None, {"x": batch})[0]
    for i in range(16):
        np.testing.assert_array_equal(together[i], sess.run(None, {"x": batch[i:i + 1]})[0][0])


def mlp_model(k: int = 64, n: int = 40) -> onnx.ModelProto:
    """gate and up read one activation; down reads their product; a tied head's weight is
    also read by a Gather (as the builder's embedding is)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), name)
             for name, s in (("gate", (k, n)), ("up", (k, n)), ("down", (n, k)),
                             ("head", (k, 50)))]
    nodes = [helper.make_node("MatMul", ["x", "gate"], ["g"], name="mlp/gate_proj/MatMul"),
             helper.make_node("MatMul", ["x", "up"], ["u"], name="mlp/up_proj/MatMul"),
             helper.make_node("Mul", ["g", "u"], ["h"]),
             helper.make_node("MatMul", ["h", "down"], ["d"], name="mlp/down_proj/MatMul"),
             helper.make_node("MatMul", ["d", "head"], ["logits"], name="lm_head/MatMul"),
             helper.make_node("Transpose", ["head"], ["emb"]),
             helper.make_node("Gather", ["emb", "ids"], ["e"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k]),
                     helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_rewrite_fuses_shared_inputs_and_keeps_what_it_must() -> None:
    import onnxruntime as ort

    model = mlp_model()
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert rowquant_graph(model, act_bits=16) == (4, 3)  # gate+up one operator, down, head
    ops = [n for n in model.graph.node if n.domain == kernels.DOMAIN]
    assert [list(n.output) for n in ops] == [["g", "u"], ["d"], ["logits"]]
    levels = [next(a.i for a in n.attribute if a.name == "levels") for n in ops]
    assert levels == [levels_for(64, 16), levels_for(40, 16), levels_for(64, 16)] == [
        32767, 32767, 32767]  # K of 64: int16's own limit binds before int32's
    assert not any(n.op_type == "MatMul" for n in model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    assert "head" in inits and not {"gate", "up", "down"} & inits  # the Gather keeps its fp32
    so = ort.SessionOptions()
    kernels.require(so, "the test graph")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(size=(2, 3, 64)).astype(np.float32)
    logits, e = sess.run(None, {"x": x, "ids": np.array([1, 2])})
    np.testing.assert_array_equal(e, before["head"].T[[1, 2]])
    exact = ((x @ before["gate"]) * (x @ before["up"])) @ before["down"] @ before["head"]
    assert np.linalg.norm(logits - exact) / np.linalg.norm(exact) < 0.02

    kept = mlp_model()
    assert rowquant_graph(kept, keep=("lm_head",)) == (3, 2)
    assert [n.name for n in kept.graph.node if n.op_type == "MatMul"] == ["lm_head/MatMul"]


@pytest.mark.parametrize("method", [CANDIDATE_ROWQUANT, CANDIDATE_ROWQUANT_A16],
                         ids=lambda m: m.name)
def test_the_tiny_llama_alone_and_in_a_batch_of_16(random_llama_builder: tuple[Path, Path],
                                                   tmp_path: Path, method: QuantMethod) -> None:
    """Quantized whole; close to fp32; and every request's greedy text is the same alone as in
    a continuous batch of 16 rows: every MatMul is the row-exact operator."""
    ckpt, src = random_llama_builder
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    out = quantize(src, tmp_path / "rq", method)
    graph = onnx.load(str(out)).graph
    assert not any(n.op_type == "MatMul" for n in graph.node)
    fp32 = OrtEngine(src / "model.onnx", tok, 128, [0])
    int8 = OrtEngine(out, tok, 128, [0], threads=2)
    ids = int8.encode("The json module can") * 4
    want = fp32.logits(ids)
    err = float(np.linalg.norm(int8.logits(ids) - want) / np.linalg.norm(want))
    assert 0 < err < 0.08, err  # quantized, so not exact; a wrong scale gives about 1
    prompts = [int8.encode(p) for p in
               ("def f(x):", "The quick brown fox", "import os\n", "1 2 3 4", "Return a list",
                "class A:", "x = [", "while True:", "# a comment", "print(", "for i in",
                "if a and b", "with open(", "lambda y:", "try:\n    ", "return None")]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    batched = generate_many(int8, prompts, params, max_batch=16)
    for ids_, got in zip(prompts, batched, strict=True):
        assert got.token_ids == int8.generate(ids_, params).token_ids
