"""Exact repacking of Q4_1-grid fp32 weights into MatMulNBits (models.build.pipeline.repack).

The tiny builder-exported Llama's MatMul weights are snapped to the grids the default model's
GGUF has — Q4_1 (``w = d * q + m`` per block of 32 inputs, ``d`` and ``m`` fp16) for the layers,
Q8_0 (``w = d * q``) for the tied LM head — except one weight left off any grid. The snapped fp32
graph is the reference: repacking must reproduce it, not re-quantize it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from tokenizers import Tokenizer

from models.build.pipeline.blockfit import fit_q4, pack_nibbles
from models.build.pipeline.quantize import (
    CANDIDATE_4BIT,
    CANDIDATE_Q4_REPACK,
    CANDIDATE_Q4_REPACK_OFFSET,
    quantize,
)
from models.build.pipeline.repack import REPORT_FILE, repack_graph, repack_q4_blocks
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine

BLOCK = 32
OFF_GRID = "model.layers.1.attn.o_proj.MatMul.weight"  # left as the checkpoint had it
LM_HEAD = "lm_head.MatMul.weight"  # tied to the embedding, snapped to Q8_0 like the GGUF's
# Logits of the repacked graph (fp32 compute: accuracy_level None) against the snapped fp32
# graph: ||delta|| / ||ref|| over every position. Measured about 1e-6 here (3e-6 on the 135M
# model); the symmetric int4 candidate is ~0.4 on the same graph (asserted below).
LOGITS_RTOL = 1e-5
PROMPTS = ["The json module can", "Return a new list of the items in", "x"]


def snap_q4_1(w: np.ndarray) -> np.ndarray:
    """ggml's Q4_1 round trip of a ``[K, N]`` weight, blocks of 32 along K."""
    k, n = w.shape
    b = w.reshape(k // BLOCK, BLOCK, n).astype(np.float32)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.minimum(15, np.floor((b - lo) * inv + 0.5))
    d16, m16 = (x.astype(np.float16).astype(np.float32) for x in (d, lo))
    return (d16 * q + m16).astype(np.float32).reshape(k, n)


def snap_q8_0(w: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 round trip (``d = max|w| / 127``, fp16) of a ``[K, N]`` weight."""
    k, n = w.shape
    b = w.reshape(k // BLOCK, BLOCK, n).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(b * inv)
    return (d.astype(np.float16).astype(np.float32) * q).astype(np.float32).reshape(k, n)


def eligible_weights(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """MatMuls whose B is a 2-D fp32 initializer with K divisible by 32, by weight."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        t = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT \
                and t.dims[0] % BLOCK == 0:
            out.setdefault(t.name, []).append(node)
    return out


@pytest.fixture(scope="module")
def snapped(random_llama_builder: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's graph with its eligible weights on Q4_1 / Q8_0 grids (one off-grid)."""
    src = random_llama_builder[1]
    out = tmp_path_factory.mktemp("repack") / "snapped"
    shutil.copytree(src, out)
    model = onnx.load(str(src / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = eligible_weights(model)
    assert OFF_GRID in weights and LM_HEAD in weights and len(weights) >= 6
    for name in weights:
        w = numpy_helper.to_array(inits[name])
        if name != OFF_GRID:
            w = snap_q8_0(w) if name == LM_HEAD else snap_q4_1(w)
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    (out / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.fixture(scope="module")
def tokenizer(random_llama_builder: tuple[Path, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(random_llama_builder[0] / "tokenizer.json"))


@pytest.fixture(scope="module")
def repacked(snapped: Path) -> dict[str, Path]:
    """The snapped graph repacked in both layouts, fp32 compute (accuracy_level None), with the
    builder's genai_config.json so that both graphs decode through the same KV-buffer path."""
    out = {}
    for zp in ("float", "offset"):
        out[zp] = repack_q4_blocks(snapped, snapped.parent / f"repacked-{zp}",
                                   accuracy_level=None, zero_points=zp,  # type: ignore[arg-type]
                                   int8_accuracy_level=None).parent
        shutil.copy2(snapped / "genai_config.json", out[zp])
    return out


def engine(variant: Path, tokenizer: Tokenizer) -> OrtEngine:
    return OrtEngine(variant / "model.onnx", tokenizer, 128, [0])


def logits_rel_err(a: OrtEngine, ref: OrtEngine) -> float:
    errs = []
    for prompt in PROMPTS:
        ids = ref.encode(prompt) * 3  # a few dozen positions
        want = ref.logits(ids)
        errs.append(float(np.linalg.norm(a.logits(ids) - want) / np.linalg.norm(want)))
    return max(errs)


# -- packing, against the op itself --------------------------------------------------------


@pytest.mark.parametrize("zero_points", ["float", "offset"])
def test_one_matmul_reproduces_its_q4_1_weight(zero_points: str) -> None:
    rng = np.random.default_rng(0)
    w = snap_q4_1(rng.normal(0.3, 1.0, (96, 40)).astype(np.float32))  # blocks off-centre
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
        [numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    report, left = repack_graph(model, accuracy_level=None, zero_points=zero_points)  # type: ignore[arg-type]
    action = {"float": "int4-float-zp", "offset": "int4-offset"}[zero_points]
    assert left == [] and [t.action for t in report.tensors] == [action]
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}
    x = rng.normal(size=(5, 96)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5 * float(np.abs(x @ w).max()))


def test_nibbles_are_packed_low_first() -> None:
    q = np.arange(16, dtype=np.uint8)[None, :]
    assert pack_nibbles(q).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]


def test_fit_recovers_q4_1_and_rejects_a_small_nudge() -> None:
    w = snap_q4_1(np.random.default_rng(1).normal(size=(64, 24)).astype(np.float32))
    assert fit_q4(w).max_rel_err < 1e-6
    w[5, 7] += 0.05 * (w[:32, 7].max() - w[:32, 7].min()) / 15  # 5 % of one grid step
    assert fit_q4(w).max_rel_err > 1e-3


# -- the tiny model ------------------------------------------------------------------------


@pytest.mark.parametrize("zero_points", ["float", "offset"])
def test_every_on_grid_matmul_becomes_matmulnbits(snapped: Path, repacked: dict[str, Path],
                                                  zero_points: str) -> None:
    before = onnx.load(str(snapped / "model.onnx"))
    after = onnx.load(str(repacked[zero_points] / "model.onnx"))
    inits = {t.name: t for t in after.graph.initializer}
    producers = {o: n for n in after.graph.node for o in n.output}
    weights = eligible_weights(before)
    on_grid = {w: nodes for w, nodes in weights.items() if w not in (OFF_GRID, LM_HEAD)}
    assert len(on_grid) >= 5
    dims = {t.name: tuple(t.dims) for t in before.graph.initializer}
    for wname, nodes in {**on_grid, LM_HEAD: weights[LM_HEAD]}.items():
        k, n = dims[wname]
        for old in nodes:
            new = producers[old.output[0]]
            if zero_points == "offset" and wname != LM_HEAD:
                assert new.op_type == "Add"  # MatMulNBits + block sums @ offsets
                new = next(producers[i] for i in new.input
                           if producers[i].op_type == "MatMulNBits")
            assert new.op_type == "MatMulNBits" and new.domain == "com.microsoft"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in new.attribute}
            bits = 8 if wname == LM_HEAD else 4
            assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, bits,
                                                                                   BLOCK)
            b = inits[new.input[1]]
            assert b.data_type == TensorProto.UINT8
            assert list(b.dims) == [n, k // BLOCK, BLOCK * bits // 8]
            assert list(inits[new.input[2]].dims) == [n * k // BLOCK]
            if zero_points == "float" and bits == 4:
                zp = inits[new.input[3]]
                assert zp.data_type == TensorProto.FLOAT and list(zp.dims) == [n * k // BLOCK]
            else:
                assert len(new.input) == 3  # the op's default zero point (8, or 128 for 8 bits)
    # what is left as MatMul: the off-grid weight, the K % 32 != 0 ones, block sums / offsets
    left = {n.input[1] for n in after.graph.node if n.op_type == "MatMul"}
    not_eligible = {n.input[1] for n in before.graph.node if n.op_type == "MatMul"} - set(weights)
    assert not_eligible  # intermediate_size 172: down_proj's K is not a multiple of 32
    helpers = {x for x in left if x.startswith("repack.") or x.endswith("_offset")}
    assert left - helpers == {OFF_GRID} | not_eligible
    assert bool(helpers) == (zero_points == "offset")
    assert LM_HEAD in inits  # still there for the tied embedding's Gather


@pytest.mark.parametrize("zero_points", ["float", "offset"])
def test_logits_match_the_snapped_fp32_graph(snapped: Path, repacked: dict[str, Path],
                                             tokenizer: Tokenizer, zero_points: str) -> None:
    ref = engine(snapped, tokenizer)
    assert logits_rel_err(engine(repacked[zero_points], tokenizer), ref) < LOGITS_RTOL


def test_symmetric_int4_does_not_meet_that_tolerance(snapped: Path,
                                                     tokenizer: Tokenizer) -> None:
    """The tolerance above separates an exact repack from a re-quantization."""
    sym = quantize(snapped, snapped.parent / "sym-int4", CANDIDATE_4BIT).parent
    assert logits_rel_err(engine(sym, tokenizer), engine(snapped, tokenizer)) > 100 * LOGITS_RTOL


@pytest.mark.parametrize("zero_points", ["float", "offset"])
def test_greedy_tokens_are_identical(snapped: Path, repacked: dict[str, Path],
                                     tokenizer: Tokenizer, zero_points: str) -> None:
    ref, got = engine(snapped, tokenizer), engine(repacked[zero_points], tokenizer)
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    for prompt in PROMPTS:
        ids = ref.encode(prompt)
        want = ref.generate(ids, params).token_ids
        assert got.generate(ids, params).token_ids == want
        assert len(set(want)) > 5  # a varied continuation, so agreement is not by accident


def test_an_off_grid_tensor_is_detected_and_left_fp32(snapped: Path,
                                                      repacked: dict[str, Path]) -> None:
    report = json.loads((repacked["float"] / REPORT_FILE).read_text())
    by_weight = {t["weight"]: t for t in report["tensors"]}
    off = by_weight[OFF_GRID]
    assert off["grid"] is None and off["action"] == "fp32"
    assert off["q4_max_rel_err"] > 1e-2 and off["q8_max_rel_err"] > 1e-3
    assert by_weight[LM_HEAD]["grid"] == "q8" and by_weight[LM_HEAD]["action"] == "int8-exact"
    on_grid = [t for w, t in by_weight.items() if w not in (OFF_GRID, LM_HEAD)]
    assert on_grid and all(t["grid"] == "q4" and t["q4_max_rel_err"] < 1e-6 for t in on_grid)
    after = onnx.load(str(repacked["float"] / "model.onnx"))
    kept = [n for n in after.graph.node if OFF_GRID in n.input]
    assert [n.op_type for n in kept] == ["MatMul"]
    w = next(t for t in after.graph.initializer if t.name == OFF_GRID)
    ref = next(t for t in onnx.load(str(snapped / "model.onnx")).graph.initializer
               if t.name == OFF_GRID)
    assert np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(ref))


def test_off_grid_tensors_can_fall_back_to_symmetric_int4(snapped: Path) -> None:
    out = repack_q4_blocks(snapped, snapped.parent / "fallback", int8_grid=False,
                           fallback="int4").parent
    report = json.loads((out / REPORT_FILE).read_text())
    actions = {t["weight"]: t["action"] for t in report["tensors"]}
    assert actions[OFF_GRID] == actions[LM_HEAD] == "int4-symmetric"
    assert set(actions.values()) == {"int4-float-zp", "int4-symmetric"}
    after = onnx.load(str(out / "model.onnx"))
    assert not [n for n in after.graph.node if n.op_type == "MatMul" and OFF_GRID in n.input]


@pytest.mark.parametrize("method", [CANDIDATE_Q4_REPACK, CANDIDATE_Q4_REPACK_OFFSET],
                         ids=lambda m: m.name)
def test_quantize_dispatches_the_repack(snapped: Path, method) -> None:  # type: ignore[no-untyped-def]
    out = quantize(snapped, snapped.parent / method.name, method).parent
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["accuracy_level"] == method.accuracy_level == 4
    layout = "float-zp" if method.family == "q4repack" else "offset"
    assert f"int4-{layout}" in {t["action"] for t in report["tensors"]}
    assert (out / "config.json").is_file() and not (out / "genai_config.json").exists()
