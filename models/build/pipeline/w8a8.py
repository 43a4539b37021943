"""W8A8 with a scale per activation row: int8 weights per output channel, activations quantized
to uint8 per token at run time, multiplied by ``MatMulInteger`` (onnxruntime's u8s8 QGEMM,
VNNI/AMX where the CPU has them).

``quantize_dynamic`` (the ``dynamic`` family) quantizes each activation with *one* scale for the
whole tensor: at decode time that tensor holds one row per sequence in the batch, so a request's
numbers depend on which other requests share its step, and one outlier row coarsens every row's
grid (quality 0.65 on SmolLM2-135M). Here each row (token) gets its own scale::

    m = max(|x|, eps) over the row          s = m / 127
    q = round(x * 127 / m) + 128            (uint8, 1..255)
    y = float(MatMulInteger(q, Wq, 128)) * s * w_scale

so a row's result does not depend on the other rows, and the weights are int8 with one scale
per output column (``w_scale = max |W[:, n]| / 63``) and only 7 bits used (|q| <= 63).

Why 7 bits: without VNNI, onnxruntime's u8s8 kernel multiplies with AVX2 ``vpmaddubsw``, which
adds two u8 x s8 products into a *saturating* int16: 255 x 127 x 2 overflows it, and the graph
computes wrong sums on AVX2-only CPUs (perplexity 21.4 instead of about 18.5 on SmolLM2-135M).
With |q| <= 63 the pair is at most 255 x 63 x 2 = 32130 and every x86 kernel is exact;
onnxruntime's own quantizer does the same (``reduce_range``). uint8 weights with a zero point of
128 are exact too but take the slower u8u8 kernel (5.5x u8s8 at 16 rows, K=576, N=1536, on a
Xeon with AMX).

The quantization of one activation is shared by every ``MatMul`` that reads it (q/k/v,
gate/up). ``keep`` names substrings of MatMul node names that stay fp32 (the MLP's ``down_proj``
reads activations with the largest outliers).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.build.pipeline.export import ONNX_FILE, copy_sidecars
from models.build.pipeline.rewrite import fp32_matmuls, replace_matmuls, unused_after

if TYPE_CHECKING:
    import onnx

_EPS = 1e-8


W_MAX = 63  # weights use 7 bits: exact on AVX2's saturating u8 x s8 pairs (module doc)


def quantize_weight(w: np.ndarray, w_max: int = W_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of ``w`` [K, N] within ±``w_max``:
    ``(q int8 [K, N], scale fp32 [N])`` with ``w ≈ q * scale``; an all-zero column gets scale 1
    (its q are 0)."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / w_max, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -w_max, w_max).astype(np.int8)
    return q, scale


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The graph's activation step in numpy (the reference the tests hold the graph to):
    ``(q uint8, s fp32 [..., 1])`` with ``x ≈ (q - 128) * s`` row by row."""
    m = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(_EPS)).astype(np.float32)
    q = (np.rint(x * (np.float32(127.0) / m)) + 128).astype(np.uint8)
    return q, (m / np.float32(127.0)).astype(np.float32)


def w8a8_graph(model: onnx.ModelProto, keep: Iterable[str] = ()) -> tuple[int, int]:
    """Rewrite ``model`` in place; returns (MatMuls quantized, MatMuls kept fp32)."""
    from onnx import TensorProto, helper, numpy_helper

    keep = tuple(keep)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = {t.name: t for t in graph.initializer}

    new_inits = [
        numpy_helper.from_array(np.array(_EPS, np.float32), "w8a8.eps"),
        numpy_helper.from_array(np.array(127.0, np.float32), "w8a8.q_max"),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), "w8a8.inv_q_max"),
        numpy_helper.from_array(np.array(128.0, np.float32), "w8a8.offset"),
        numpy_helper.from_array(np.array(128, np.uint8), "w8a8.zero_point"),
    ]
    if opset >= 18:
        new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), "w8a8.last_axis"))
    quantized: dict[str, tuple[str, str]] = {}  # activation → (uint8 rows, row scales)
    replacement: dict[str, list[onnx.NodeProto]] = {}
    done: dict[str, str] = {}  # weight → its int8 initializer's base name
    n_q = 0

    def rows(x: str) -> tuple[tuple[str, str], list[onnx.NodeProto]]:
        if x in quantized:
            return quantized[x], []
        b = f"w8a8/{len(quantized)}"
        reduce = (helper.make_node("ReduceMax", [f"{b}/abs", "w8a8.last_axis"], [f"{b}/amax"],
                                   keepdims=1) if opset >= 18 else
                  helper.make_node("ReduceMax", [f"{b}/abs"], [f"{b}/amax"], axes=[-1],
                                   keepdims=1))
        nodes = [
            helper.make_node("Abs", [x], [f"{b}/abs"]),
            reduce,
            helper.make_node("Max", [f"{b}/amax", "w8a8.eps"], [f"{b}/m"]),
            helper.make_node("Div", ["w8a8.q_max", f"{b}/m"], [f"{b}/inv"]),
            helper.make_node("Mul", [f"{b}/m", "w8a8.inv_q_max"], [f"{b}/scale"]),
            helper.make_node("Mul", [x, f"{b}/inv"], [f"{b}/x"]),
            helper.make_node("Round", [f"{b}/x"], [f"{b}/r"]),
            helper.make_node("Add", [f"{b}/r", "w8a8.offset"], [f"{b}/u"]),
            helper.make_node("Cast", [f"{b}/u"], [f"{b}/q"], to=TensorProto.UINT8),
        ]
        for i, nd in enumerate(nodes):
            nd.name = f"{b}/{nd.op_type}_{i}"
        quantized[x] = (f"{b}/q", f"{b}/scale")
        return quantized[x], nodes

    matmuls = fp32_matmuls(graph)
    n_kept = len(matmuls) - len(chosen := fp32_matmuls(graph, keep))
    for node in chosen:
        if node.input[1] not in done:
            q, scale = quantize_weight(numpy_helper.to_array(inits[node.input[1]]))
            base = f"{node.input[1]}_w8"
            new_inits += [numpy_helper.from_array(q, base),
                          numpy_helper.from_array(scale, f"{base}_scale")]
            done[node.input[1]] = base
        base = done[node.input[1]]
        (xq, xs), nodes = rows(node.input[0])
        o = node.output[0]
        nodes += [
            helper.make_node("MatMulInteger", [xq, base, "w8a8.zero_point"], [f"{o}/i32"],
                             name=f"{node.name}_w8a8"),
            helper.make_node("Cast", [f"{o}/i32"], [f"{o}/f32"], to=TensorProto.FLOAT,
                             name=f"{node.name}_w8a8_cast"),
            helper.make_node("Mul", [f"{o}/f32", f"{base}_scale"], [f"{o}/wscaled"],
                             name=f"{node.name}_w8a8_wscale"),
            helper.make_node("Mul", [f"{o}/wscaled", xs], [o], name=f"{node.name}_w8a8_xscale"),
        ]
        replacement[o] = nodes
        n_q += 1

    replace_matmuls(graph, replacement, unused_after(graph, replacement, set(done)), new_inits)
    return n_q, n_kept


def quantize_w8a8(src_dir: Path, dst_dir: Path, keep: Iterable[str] = ()) -> Path:
    """Write the W8A8 copy of ``src_dir/model.onnx`` to ``dst_dir``; returns its graph's path."""
    import onnx

    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    model = onnx.load(str(src_dir / ONNX_FILE))
    w8a8_graph(model, keep)
    dst = dst_dir / ONNX_FILE
    onnx.save(model, str(dst))
    copy_sidecars(src_dir, dst_dir)
    return dst
