"""Exact 4-bit repacking of fp32 weights that came from a Q4_1 (or Q8_0) GGUF.

The default model's only offline source is a Q4_1 GGUF: every weight matrix was stored in blocks
of 32 consecutive input features as ``w = d * q + m`` (``q`` in 0..15, ``d`` and ``m`` fp16), and
``full`` is those weights dequantized to fp32. Such a block holds at most 16 distinct values on an
evenly spaced grid whose ends are present (Q4_1's quantizer maps the block's min to 0 and its max
to 15), so an asymmetric 4-bit block-32 quantization with ``scale = (max - min) / 15`` and a
*float* zero point ``zp = -min / scale`` reproduces those weights up to fp32 rounding, where the
symmetric integer quantizers of :mod:`models.pipeline.quantize` re-quantize them (and change the
model's answers).

Every ``MatMul`` whose ``B`` is a 2-D fp32 initializer with ``K`` divisible by the block size is
checked: its blocks are fitted to the grid and the largest reconstruction error, relative to the
block's largest magnitude, must stay under ``tolerance``. Tensors that pass become
``com.microsoft.MatMulNBits`` nodes; the others (in SmolLM2's GGUF the tied embedding / LM head,
which is Q8_0) are either fitted to Q8_0's symmetric 255-level grid and repacked as exact 8-bit
``MatMulNBits`` (``int8_grid=True``), or kept fp32 (``fallback="fp32"``), or quantized by the
standard symmetric int4 quantizer (``fallback="int4"``, lossy). The report says which.

Two layouts for the 4-bit tensors (``zero_points``):

* ``"float"``: ``MatMulNBits`` with float zero points, one per block (the op's formula is
  ``w = (q - zp) * scale``). onnxruntime's CPU kernel does not pre-pack such weights: every call
  dequantizes the whole matrix to fp32 and runs an fp32 GEMM, whatever ``accuracy_level`` says
  (``contrib_ops/cpu/quantization/matmul_nbits.cc``: ``PrePack`` returns early when
  ``has_unquantized_zero_point_``). Exact, but measured 5x *slower* than the fp32 graph
  (SmolLM2-135M, 2 AVX2 threads: 9 against 47 tok/s).
* ``"offset"``: the same ``q`` and ``scale`` with the op's default zero point (8), which runs the
  pre-packed kernels the symmetric candidates use, plus the per-block offset
  ``o = min + 8 * scale`` applied as a small fp32 product: ``x @ W = MatMulNBits(x) + S(x) @ O``
  where ``S(x)`` is ``x``'s sum over each block of 32 inputs (one ``MatMul`` with a 0/1 matrix,
  shared by the consumers of one activation) and ``O`` is ``[K / 32, N]``. Exact in the weights;
  only the rounding of the sums differs from the fp32 ``MatMul``. The extra nodes cost about a
  third of the symmetric int4 candidate's speed (122 against 179 tok/s, same setting).

``accuracy_level`` applies to the 4-bit nodes: 4 quantizes the activations to int8 per block
(the int8 candidates do the same; about 5 % relative logit error on SmolLM2 whatever the
weights), ``None`` computes in fp32 (logits within 3e-6 of the fp32 graph, but x86's fp32 4-bit
kernel is barely faster than fp32). ``int8_accuracy_level`` applies to the exact 8-bit nodes and
defaults to 4: onnxruntime has no pre-packed fp32-compute 8-bit kernel on x86, so ``None`` there
dequantizes the whole matrix on every call (the 49152 x 576 LM head: 180 ms a token).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.pipeline.export import ONNX_FILE

if TYPE_CHECKING:
    import onnx

REPORT_FILE = "repack_report.json"
DEFAULT_TOLERANCE = 1e-5
ZeroPoints = Literal["float", "offset"]
Fallback = Literal["fp32", "int4"]
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of initializers above which the graph is saved with
# external data (protobuf's hard limit is 2 GiB)


# -- fitting blocks to grids (numpy, vectorized over the whole tensor) -----------------------


@dataclass
class Q4Fit:
    """A ``[K, N]`` weight fitted to a 16-level grid per block of ``block_size`` along K."""

    q: np.ndarray  # uint8 [N, n_blocks, block_size], values 0..15
    scale: np.ndarray  # float32 [N, n_blocks]
    minimum: np.ndarray  # float32 [N, n_blocks]
    max_abs_err: float  # of the reconstruction the kernel computes, over the tensor
    max_rel_err: float  # the same relative to each block's largest |w|, worst block


@dataclass
class Q8Fit:
    """A ``[K, N]`` weight fitted to Q8_0's symmetric grid ``w = d * q``, ``|q| <= 127``."""

    q: np.ndarray  # uint8 [N, n_blocks, block_size], q + 128
    scale: np.ndarray  # float32 [N, n_blocks]
    max_abs_err: float
    max_rel_err: float


def _column_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` → a ``[K / block_size, block_size, N]`` float32 view (no copy when it already
    is float32 and contiguous): reductions over axis 1 run along contiguous rows of N."""
    k, n = weight.shape
    return np.ascontiguousarray(weight, dtype=np.float32).reshape(k // block_size, block_size, n)


def _to_op_order(a: np.ndarray) -> np.ndarray:
    """``[n_blocks, block_size, N]`` → ``[N, n_blocks, block_size]``, the op's order."""
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def _errors(recon: np.ndarray, wb: np.ndarray, peak: np.ndarray) -> tuple[float, float]:
    """Largest |recon - wb| over the tensor, and over each block relative to ``peak`` (the
    block's largest |w|); ``recon`` is overwritten."""
    np.subtract(recon, wb, out=recon)
    np.abs(recon, out=recon)
    err = recon.max(axis=1)
    rel = np.divide(err, peak, out=np.zeros_like(err), where=peak > 0)
    return float(err.max(initial=0.0)), float(rel.max(initial=0.0))


def fit_q4(weight: np.ndarray, block_size: int = 32) -> Q4Fit:
    """Fit every block to ``min + scale * q``, ``scale = (max - min) / 15``; the errors are those
    of ``q * scale - scale * zp`` with ``zp = -min / scale`` in fp32, the kernel's formula."""
    wb = _column_blocks(weight, block_size)
    lo, hi = wb.min(axis=1), wb.max(axis=1)  # [n_blocks, N]
    scale = (hi - lo) / np.float32(15)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)  # constant block: q = 0
    q = np.subtract(wb, lo[:, None, :])
    np.divide(q, scale[:, None, :], out=q)
    np.rint(q, out=q)
    np.clip(q, 0, 15, out=q)
    zp = (-lo / scale).astype(np.float32)
    recon = np.multiply(q, scale[:, None, :])
    np.subtract(recon, (scale * zp)[:, None, :], out=recon)
    abs_err, rel_err = _errors(recon, wb, np.maximum(np.abs(lo), np.abs(hi)))
    return Q4Fit(_to_op_order(q.astype(np.uint8)), np.ascontiguousarray(scale.T),
                 np.ascontiguousarray(lo.T), abs_err, rel_err)


def fit_q8(weight: np.ndarray, block_size: int = 32) -> Q8Fit:
    """Fit every block to Q8_0's ``d * q``, ``d = max|w| / 127``, ``q`` in -127..127."""
    wb = _column_blocks(weight, block_size)
    peak = np.maximum(np.abs(wb.min(axis=1)), np.abs(wb.max(axis=1)))
    scale = peak / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.divide(wb, scale[:, None, :])
    np.rint(q, out=q)
    np.clip(q, -128, 127, out=q)
    recon = np.multiply(q, scale[:, None, :])
    abs_err, rel_err = _errors(recon, wb, peak)
    q += 128
    return Q8Fit(_to_op_order(q.astype(np.uint8)), np.ascontiguousarray(scale.T), abs_err,
                 rel_err)


def _fit_q4_checked(weight: np.ndarray, block_size: int,
                    tolerance: float) -> tuple[Q4Fit, bool, bool]:
    """(fit, within ``tolerance``, fitted on a sample only). A first look at 256 columns rejects
    an off-grid wide tensor (the 49152-wide LM head) without fitting all of it; the errors are
    then those of the sample, a lower bound."""
    if weight.shape[1] > 512:
        sample = fit_q4(weight[:, :256], block_size)
        if sample.max_rel_err > tolerance:
            return sample, False, True
    fit = fit_q4(weight, block_size)
    return fit, fit.max_rel_err <= tolerance, False


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 ``[..., block_size]`` of values 0..15 → ``[..., block_size / 2]``, element ``2i`` in
    the low nibble of byte ``i`` (MatMulNBits' 4-bit layout)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


# -- the report -------------------------------------------------------------------------------


@dataclass
class TensorReport:
    """What happened to one weight."""

    weight: str
    nodes: list[str]
    k: int
    n: int
    grid: str | None  # "q4" (16 levels), "q8" (Q8_0's 255 levels) or None (neither)
    action: str  # "int4-float-zp", "int4-offset", "int8-exact", "fp32", "int4-symmetric"
    # reconstruction errors: largest |w' - w|, and the largest relative to its block's max |w|
    q4_max_abs_err: float
    q4_max_rel_err: float
    q4_sampled: bool  # the 4-bit errors are those of the first 256 columns (a lower bound)
    q8_max_abs_err: float | None = None  # when the 8-bit grid was tried
    q8_max_rel_err: float | None = None


@dataclass
class RepackReport:
    block_size: int
    accuracy_level: int | None
    zero_points: str
    tolerance: float
    tensors: list[TensorReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # MatMuls not eligible (B not a constant…)
    seconds: float = 0.0

    def by_action(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.tensors:
            out.setdefault(t.action, []).append(t.weight)
        return out

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in sorted(self.by_action().items())]
        return f"{', '.join(parts)} in {self.seconds:.1f} s"


# -- graph surgery --------------------------------------------------------------------------


def _matmul_nbits(name: str, inputs: list[str], output: str, k: int, n: int, bits: int,
                  block_size: int, accuracy_level: int | None) -> onnx.NodeProto:
    import onnx

    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    return onnx.helper.make_node("MatMulNBits", inputs, [output], name=name,
                                 domain="com.microsoft", **attrs)


def _name(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's when it has none (names must stay unique)."""
    return node.name or node.output[0]


def repack_graph(
    model: onnx.ModelProto,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    zero_points: ZeroPoints = "float",
    int8_grid: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    int8_accuracy_level: int | None = 4,
) -> tuple[RepackReport, list[str]]:
    """Repack ``model``'s grid-aligned MatMul weights in place.

    Returns the report and the names of the MatMul nodes left fp32 (no grid matched), for a
    fallback quantizer to pick up.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    start = time.perf_counter()
    report = RepackReport(block_size, accuracy_level, zero_points, tolerance)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # MatMuls by weight (a weight may feed several)
    eligible: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        b = inits.get(node.input[1])
        ok = (b is not None and len(b.dims) == 2 and b.data_type == TensorProto.FLOAT
              and b.dims[0] % block_size == 0 and block_size % 2 == 0)
        if ok:
            eligible.setdefault(node.input[1], []).append(node)
        else:
            report.skipped.append(node.name)

    new_inits: list[onnx.TensorProto] = []
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # replaced node's output → replacement
    block_sums: dict[tuple[str, int], str] = {}  # (activation, K) → its block-sum tensor
    indicator: dict[int, str] = {}  # K → the 0/1 [K, K / block_size] initializer
    left_fp32: list[str] = []
    removable: list[str] = []

    def block_sum(activation: str, k: int, base: str) -> tuple[str, list[onnx.NodeProto]]:
        if (activation, k) in block_sums:
            return block_sums[(activation, k)], []
        if k not in indicator:
            e = np.zeros((k, k // block_size), dtype=np.float32)
            e[np.arange(k), np.arange(k) // block_size] = 1.0
            indicator[k] = f"repack.block_sum_{k}"
            new_inits.append(numpy_helper.from_array(e, indicator[k]))
        out = f"{base}_block_sum/output_0"
        block_sums[(activation, k)] = out
        return out, [onnx.helper.make_node("MatMul", [activation, indicator[k]], [out],
                                           name=f"{base}_block_sum")]

    for wname, nodes in eligible.items():
        weight = numpy_helper.to_array(inits[wname])
        k, n = weight.shape
        fit4, on_grid, sampled = _fit_q4_checked(weight, block_size, tolerance)
        entry = TensorReport(wname, [_name(nd) for nd in nodes], k, n, None, "fp32",
                             fit4.max_abs_err, fit4.max_rel_err, sampled)
        fit8 = fit_q8(weight, block_size) if int8_grid and not on_grid else None
        if fit8 is not None:
            entry.q8_max_abs_err, entry.q8_max_rel_err = fit8.max_abs_err, fit8.max_rel_err
        if on_grid:
            entry.grid = "q4"
            packed = pack_nibbles(fit4.q)
            new_inits.append(numpy_helper.from_array(packed, f"{wname}_Q4R"))
            new_inits.append(numpy_helper.from_array(fit4.scale.reshape(-1), f"{wname}_scales"))
            if zero_points == "float":
                entry.action = "int4-float-zp"
                zp = (-fit4.minimum / fit4.scale).astype(np.float32)
                new_inits.append(numpy_helper.from_array(zp.reshape(-1), f"{wname}_zp"))
                for nd in nodes:
                    new_nodes[nd.output[0]] = [_matmul_nbits(
                        f"{_name(nd)}_Q4R", [nd.input[0], f"{wname}_Q4R", f"{wname}_scales",
                                             f"{wname}_zp"],
                        nd.output[0], k, n, 4, block_size, accuracy_level)]
            else:
                entry.action = "int4-offset"
                # w = (q - 8) * scale + offset, offset = min + 8 * scale, per block
                offset = (fit4.minimum + np.float32(8) * fit4.scale).astype(np.float32)
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(offset.T),
                                                         f"{wname}_offset"))  # [nb, N]
                for nd in nodes:
                    base = _name(nd)
                    sums, sum_nodes = block_sum(nd.input[0], k, base)
                    main, corr = f"{base}_Q4R/output_0", f"{base}_offset/output_0"
                    new_nodes[nd.output[0]] = [
                        *sum_nodes,
                        _matmul_nbits(f"{base}_Q4R", [nd.input[0], f"{wname}_Q4R",
                                                      f"{wname}_scales"],
                                      main, k, n, 4, block_size, accuracy_level),
                        onnx.helper.make_node("MatMul", [sums, f"{wname}_offset"], [corr],
                                              name=f"{base}_offset"),
                        onnx.helper.make_node("Add", [main, corr], [nd.output[0]],
                                              name=f"{base}_offset_add"),
                    ]
        elif fit8 is not None and fit8.max_rel_err <= tolerance:
            entry.grid, entry.action = "q8", "int8-exact"
            new_inits.append(numpy_helper.from_array(fit8.q, f"{wname}_Q8R"))
            new_inits.append(numpy_helper.from_array(fit8.scale.reshape(-1), f"{wname}_scales"))
            for nd in nodes:  # no zero_points input: the 8-bit default is 128
                new_nodes[nd.output[0]] = [_matmul_nbits(
                    f"{_name(nd)}_Q8R", [nd.input[0], f"{wname}_Q8R", f"{wname}_scales"],
                    nd.output[0], k, n, 8, block_size, int8_accuracy_level)]
        else:
            left_fp32.extend(nd.name for nd in nodes)  # the fallback quantizer goes by name
        report.tensors.append(entry)
        if entry.action != "fp32":
            others = [c for c in consumers.get(wname, [])
                      if not (c.op_type == "MatMul" and c.output[0] in new_nodes)]
            outputs = {o.name for o in graph.output}
            if not others and wname not in outputs:
                removable.append(wname)  # else (a tied embedding's Gather) the fp32 copy stays

    if new_nodes:
        rebuilt: list[onnx.NodeProto] = []
        for node in graph.node:
            replaced = node.op_type == "MatMul" and node.output[0] in new_nodes
            rebuilt.extend(new_nodes[node.output[0]] if replaced else [node])
        del graph.node[:]
        graph.node.extend(rebuilt)
        gone = set(removable)
        kept = [t for t in graph.initializer if t.name not in gone]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    report.seconds = time.perf_counter() - start
    return report, left_fp32


def repack_q4_blocks(
    src_dir: Path,
    dst_dir: Path,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    *,
    zero_points: ZeroPoints = "float",
    int8_grid: bool = True,
    fallback: Fallback = "fp32",
    tolerance: float = DEFAULT_TOLERANCE,
    int8_accuracy_level: int | None = 4,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Repack ``src_dir/model.onnx`` (+ external data) into ``dst_dir/model.onnx``; the report
    (every eligible weight: grid, reconstruction error, what was done) goes to
    ``dst_dir/repack_report.json``. Returns the new graph's path."""
    import onnx

    from models.pipeline.quantize import _copy_sidecars

    start = time.perf_counter()
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    model = onnx.load(str(src_dir / ONNX_FILE))  # external data loaded into the protos
    report, left = repack_graph(model, block_size, accuracy_level, zero_points, int8_grid,
                                tolerance, int8_accuracy_level)
    if left and fallback == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size,
                                         is_symmetric=True, accuracy_level=accuracy_level,
                                         nodes_to_include=left)
        quantizer.process()
        model = quantizer.model.model
        still = {nd.input[1] for nd in model.graph.node if nd.op_type == "MatMul"}
        for t in report.tensors:
            if t.action == "fp32" and t.weight not in still:
                t.action = "int4-symmetric"
    dst = dst_dir / ONNX_FILE
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > _PROTOBUF_LIMIT:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{ONNX_FILE}.data")
    else:
        onnx.save(model, str(dst))
    _copy_sidecars(src_dir, dst_dir)
    report.seconds = time.perf_counter() - start
    (dst_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
    if log is not None:
        log(f"repacked {src_dir.name}: {report.summary()}")
    return dst
