"""The ``rowquant`` family: every fp32 ``MatMul`` with a constant weight becomes greenroute's own
``RowQuantMatMul`` (``kernels/rowquant.cc``): int8 weights with one scale per output channel,
each activation row quantized inside the operator with its own scale to ``levels`` (127: int8;
up to 32767: int16, the finest that keeps ``levels x 127 x K`` within int32), exact int32
sums. MatMuls that read the same activation (gate/up; the builder already fuses q/k/v) become
one operator with one output each, so one quantization of the activation serves them.

Everything the kernel would otherwise redo per call is done here, once: the weights are
transposed to output-channel-major rows, padded along K to a multiple of 64, and their sums
(the int8 VNNI paths' offset correction) are stored beside them. ``keep`` names substrings of MatMul
node names that stay fp32 (e.g. ``lm_head``, to measure what quantizing the head costs).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.build.pipeline.export import ONNX_FILE, copy_sidecars
from models.build.pipeline.rewrite import fp32_matmuls, replace_matmuls, unused_after
from models.build.pipeline.w8a8 import quantize_weight
from models.runtime.kernels import DOMAIN, OP_ROW_QUANT

if TYPE_CHECKING:
    import onnx

K_PAD = 64  # the kernel's K step (AVX-512: 64 int8 lanes)
W_MAX = 127  # all 8 bits: our kernels cannot saturate (unlike w8a8's 7)


def padded(k: int) -> int:
    """K padded for the kernel: to a multiple of 64."""
    return -(-k // K_PAD) * K_PAD


def levels_for(k: int, bits: int) -> int:
    """The activations' largest quantized magnitude for ``bits`` (8: 127; 16: as fine as int16
    and exact int32 sums over ``k`` allow: ``levels x 127 x Kp < 2^31``)."""
    if bits <= 8:
        return 127
    return min(32767, ((1 << 31) - 1) // (W_MAX * padded(k)))


def pack_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` [K, N] fp32 to the kernel's inputs: ``(q int8 [N, Kp], scale fp32 [N], sums int32
    [N])`` with ``w[:, n] ≈ q[n, :K] * scale[n]`` (symmetric, all 8 bits) and ``q[:, K:] = 0``."""
    k, n = w.shape
    q, scale = quantize_weight(w, W_MAX)
    packed = np.zeros((n, padded(k)), np.int8)
    packed[:, :k] = q.T
    return packed, scale, packed.astype(np.int32).sum(axis=1).astype(np.int32)


def reference(x: np.ndarray, packed: np.ndarray, scale: np.ndarray,
              levels: int = 127) -> np.ndarray:
    """The operator in numpy, float op for float op (the tests hold the kernel to it exactly):
    ``x`` [..., K] fp32 → [..., N]."""
    k = x.shape[-1]
    lv = np.float32(levels)
    m = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-8)).astype(np.float32)
    q = np.rint(x * (lv / m)).astype(np.int64)
    acc = q @ packed[:, :k].astype(np.int64).T
    sx = (m / lv).astype(np.float32)
    return acc.astype(np.float32) * (sx * scale)


def rowquant_graph(model: onnx.ModelProto, keep: Iterable[str] = (),
                   act_bits: int = 8) -> tuple[int, int]:
    """Rewrite ``model`` in place (activations to 8 or up to 16 bits, :func:`levels_for`);
    returns (MatMuls now in a ``RowQuantMatMul``, operators)."""
    from onnx import helper, numpy_helper

    keep = tuple(keep)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}  # activation → its MatMuls, in graph order
    for node in fp32_matmuls(graph, keep):
        groups.setdefault(node.input[0], []).append(node)

    replacement: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    replaced_weights: set[str] = set()
    for i, (x, nodes) in enumerate(groups.items()):
        parts = [pack_weight(numpy_helper.to_array(inits[n.input[1]])) for n in nodes]
        base = f"rowquant/{i}"
        new_inits += [
            numpy_helper.from_array(np.concatenate([p[0] for p in parts]), f"{base}/w"),
            numpy_helper.from_array(np.concatenate([p[1] for p in parts]), f"{base}/scale"),
            numpy_helper.from_array(np.concatenate([p[2] for p in parts]), f"{base}/sums")]
        k = int(inits[nodes[0].input[1]].dims[0])
        fused = helper.make_node(
            OP_ROW_QUANT, [x, f"{base}/w", f"{base}/scale", f"{base}/sums"],
            [n.output[0] for n in nodes], name=f"{nodes[0].name}_rowquant", domain=DOMAIN,
            splits=[int(p[0].shape[0]) for p in parts], levels=levels_for(k, act_bits))
        replacement[nodes[0].output[0]] = [fused]
        for n in nodes[1:]:
            replacement[n.output[0]] = []
        replaced_weights.update(n.input[1] for n in nodes)

    replace_matmuls(graph, replacement, unused_after(graph, replacement, replaced_weights),
                    new_inits)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sum(len(n) for n in groups.values()), len(groups)


def quantize_rowquant(src_dir: Path, dst_dir: Path, keep: Iterable[str] = (),
                      act_bits: int = 8) -> Path:
    """Write the ``rowquant`` copy of ``src_dir/model.onnx`` to ``dst_dir``; returns its path."""
    import onnx

    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    model = onnx.load(str(src_dir / ONNX_FILE))
    rowquant_graph(model, keep, act_bits)
    dst = dst_dir / ONNX_FILE
    onnx.save(model, str(dst))
    copy_sidecars(src_dir, dst_dir)
    return dst
