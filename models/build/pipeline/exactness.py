"""Before a quantized candidate is timed, check on *this* CPU that its kernels compute what its
graph says, so no kernel enters the ladder wrong on some instruction set.

Two checks, both against references that cannot be wrong the same way:

1. **Integer kernels, exactly.** Every ``MatMulInteger`` whose weights are constant is run
   alone, with its real weights, on adversarial activations (all 255, all 0, 255 where the
   weight column is positive, random) and compared with numpy's int64 product, and every
   greenroute ``RowQuantMatMul`` likewise against its numpy reference, bit for bit: an integer
   GEMM has one right answer, so any difference is a kernel that saturates or drops bits (AVX2's
   ``vpmaddubsw`` on full-range int8 weights did: perplexity 21.4 and 10,356,927 instead of
   about 18.5 for the W8A8 and dynamic families on SmolLM2-135M).
2. **Logits, a gross-error gate.** The candidate's greedy choice at every position of a few
   prompts against its fp32 source's: quantization changes a few, a wrong kernel or scale most
   (:data:`MIN_TOP1_AGREEMENT`). The relative L2 error of the logits is recorded beside it;
   it is no gate, since sound lossy copies spread widely on it (SmolLM2-135M, this build's
   check prompts: 8-bit blocks 0.06-0.09, per-row W8A8 with 7-bit weights 0.26, 4-bit blocks
   0.47-0.59, the per-tensor dynamic copy 0.71) while their greedy choices mostly agree.

A candidate that fails is not timed; the reason goes in the manifest's race record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.runtime import kernels

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

    from models.runtime.engine.ort import OrtEngine

# Share of positions whose greedy token matches the fp32 source's. Measured: the tiny test
# Llama with its weight scales shuffled across channels 0.14; on SmolLM2-135M the coarsest sound
# copy (4-bit, block 128, quality 0.65) 0.53, the per-tensor dynamic copy 0.61, 8-bit blocks
# 0.92-0.95 (docs/ladder.md).
MIN_TOP1_AGREEMENT = 0.35


def _const(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


def _probe_rows(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Four uint8 [K] rows that push an integer dot product to its extremes."""
    k = w.shape[0]
    return np.stack([np.full(k, 255, np.uint8), np.zeros(k, np.uint8),
                     np.where(w[:, 0] > 0, 255, 0).astype(np.uint8),
                     rng.integers(0, 256, k, dtype=np.uint8)])


def _matmul_integer_model(w: np.ndarray, a_zp: np.ndarray, b_zp: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", w.shape[1]])],
        [numpy_helper.from_array(w, "b"), numpy_helper.from_array(a_zp, "a_zp"),
         numpy_helper.from_array(b_zp, "b_zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def integer_kernel_errors(model: onnx.ModelProto | Path, limit: int = 3) -> list[str]:
    """Each constant-weight ``MatMulInteger`` in ``model`` run alone on adversarial rows against
    numpy's exact product; returns one line per node that differs (at most ``limit``)."""
    import onnx
    import onnxruntime as ort

    if isinstance(model, Path):
        model = onnx.load(str(model))
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()  # one probe session a node, all on these options
    opts.intra_op_num_threads = 1
    if any(n.domain == kernels.DOMAIN for n in model.graph.node):
        kernels.require(opts, "the candidate's graph")
    errors: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type == kernels.OP_ROW_QUANT and node.domain == kernels.DOMAIN:
            error = _row_quant_error(node, inits, rng, opts)
            if error:
                errors.append(error)
            if len(errors) >= limit:
                break
            continue
        if node.op_type != "MatMulInteger" or node.input[1] in seen:
            continue
        w = _const(inits, node.input[1])
        if w is None or w.ndim != 2:
            continue
        seen.add(node.input[1])
        a_zp = (_const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None)
        a_zp = np.array(128, np.uint8) if a_zp is None else a_zp  # dynamic: chosen at run time
        b_zp = (_const(inits, node.input[3]) if len(node.input) > 3 and node.input[3] else None)
        b_zp = np.zeros((), w.dtype) if b_zp is None else b_zp
        a = _probe_rows(w, rng)
        sess = ort.InferenceSession(_matmul_integer_model(w, a_zp, b_zp), opts,
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"a": a})[0].astype(np.int64)
        want = (a.astype(np.int64) - a_zp.astype(np.int64)) @ (
            w.astype(np.int64) - b_zp.astype(np.int64))
        if not np.array_equal(got, want):
            bad = int(np.count_nonzero(got != want))
            errors.append(f"{node.name or node.output[0]}: {bad} of {got.size} sums wrong "
                          f"(max error {int(np.abs(got - want).max())})")
            if len(errors) >= limit:
                break
    return errors


def _row_quant_error(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                     rng: np.random.Generator, opts: ort.SessionOptions) -> str | None:
    """greenroute's ``RowQuantMatMul`` run alone, with its real weights, on rows that push its
    sums to their extremes, against its numpy reference bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from models.build.pipeline.rowquant import reference

    packed, scale = _const(inits, node.input[1]), _const(inits, node.input[2])
    if packed is None or scale is None:
        return None
    k = packed.shape[1]  # the padded width: the operator takes any K it pads to that
    x = np.stack([np.sign(packed[0, :k]).astype(np.float32) * 3, -np.ones(k, np.float32),
                  rng.standard_normal(k, dtype=np.float32) * 50,
                  np.zeros(k, np.float32)])
    outs = [f"y{i}" for i in range(len(node.output))]
    probe = helper.make_node(node.op_type, ["x", *node.input[1:]], outs, domain=node.domain)
    for a in node.attribute:
        probe.attribute.append(a)
    used = [inits[n] for n in node.input[1:]]
    graph = helper.make_graph(
        [probe], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], used)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    got = np.concatenate(ort.InferenceSession(model.SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"]
                                              ).run(None, {"x": x}), axis=-1)
    levels = next((int(a.i) for a in node.attribute if a.name == "levels"), 127)
    want = reference(x, packed, scale, levels)
    if np.array_equal(got, want):
        return None
    bad = int(np.count_nonzero(got != want))
    return f"{node.name}: {bad} of {got.size} outputs differ from the reference"


def logits_agreement(candidate: OrtEngine, reference: OrtEngine,
                     prompts: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(share of positions with the reference's greedy token, largest relative L2 error of
    the logits), over every position of ``prompts``."""
    same = total = 0
    worst = 0.0
    for ids in prompts:
        want, got = reference.logits(ids), candidate.logits(ids)
        same += int(np.count_nonzero(want.argmax(-1) == got.argmax(-1)))
        total += want.shape[0]
        scale = max(float(np.linalg.norm(want)), 1e-9)
        worst = max(worst, float(np.linalg.norm(got - want)) / scale)
    return same / max(total, 1), worst


def check_candidate(graph: Path, candidate: OrtEngine, reference: OrtEngine,
                    prompts: Sequence[Sequence[int]]) -> dict[str, object]:
    """Both checks: ``{"ok", "integer_kernels", "top1_agreement", "logits_rel_error",
    "reason" (when not ok)}``."""
    errors = integer_kernel_errors(graph)
    agree, err = logits_agreement(candidate, reference, prompts)
    record: dict[str, object] = {"ok": not errors and agree >= MIN_TOP1_AGREEMENT,
                                 "integer_kernels": errors or "exact",
                                 "top1_agreement": round(agree, 4),
                                 "logits_rel_error": round(err, 4)}
    if errors:
        record["reason"] = f"integer kernel not exact on this CPU: {errors[0]}"
    elif agree < MIN_TOP1_AGREEMENT:
        record["reason"] = (f"greedy tokens agree with the fp32 source's at {agree:.0%} of "
                            f"positions (at least {MIN_TOP1_AGREEMENT:.0%} needed)")
    return record
