"""Exact 4-bit repacking of fp32 weights that came from a Q4_1 (or Q8_0) GGUF.

The default model's only offline source is a Q4_1 GGUF: every weight matrix was stored in blocks
of 32 consecutive input features as ``w = d * q + m`` (``q`` in 0..15, ``d`` and ``m`` fp16), and
``full`` is those weights dequantized to fp32. Such a block holds at most 16 distinct values on an
evenly spaced grid whose ends are present (Q4_1's quantizer maps the block's min to 0 and its max
to 15), so an asymmetric 4-bit block-32 quantization with ``scale = (max - min) / 15`` and a
*float* zero point ``zp = -min / scale`` reproduces those weights up to fp32 rounding, where
the symmetric integer quantizers of :mod:`models.build.pipeline.quantize` re-quantize them (and
change the model's answers).

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

from models.build.pipeline.blockfit import fit_q4_checked, fit_q8, pack_nibbles
from models.build.pipeline.export import ONNX_FILE, copy_sidecars
from models.build.pipeline.rewrite import replace_matmuls

if TYPE_CHECKING:
    import onnx

REPORT_FILE = "repack_report.json"
DEFAULT_TOLERANCE = 1e-5
ZeroPoints = Literal["float", "offset"]
Fallback = Literal["fp32", "int4"]
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of initializers above which the graph is saved with
# external data (protobuf's hard limit is 2 GiB)


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
    from onnx import numpy_helper

    start = time.perf_counter()
    report = RepackReport(block_size, accuracy_level, zero_points, tolerance)
    r = _Rewrite(model.graph, block_size, accuracy_level, int8_accuracy_level)
    left_fp32: list[str] = []
    for wname, nodes in r.eligible(report).items():
        weight = numpy_helper.to_array(r.inits[wname])
        k, n = weight.shape
        fit4, on_grid, sampled = fit_q4_checked(weight, block_size, tolerance)
        entry = TensorReport(wname, [_name(nd) for nd in nodes], k, n, None, "fp32",
                             fit4.max_abs_err, fit4.max_rel_err, sampled)
        fit8 = fit_q8(weight, block_size) if int8_grid and not on_grid else None
        if fit8 is not None:
            entry.q8_max_abs_err, entry.q8_max_rel_err = fit8.max_abs_err, fit8.max_rel_err
        if on_grid:
            entry.grid = "q4"
            entry.action = r.int4(wname, nodes, k, n, fit4, zero_points)
        elif fit8 is not None and fit8.max_rel_err <= tolerance:
            entry.grid, entry.action = "q8", "int8-exact"
            r.int8(wname, nodes, k, n, fit8)
        else:
            left_fp32.extend(nd.name for nd in nodes)  # the fallback quantizer goes by name
        report.tensors.append(entry)
        if entry.action != "fp32":
            r.drop_if_unread(wname)
    if r.new_nodes:
        replace_matmuls(model.graph, r.new_nodes, set(r.removable), r.new_inits)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    report.seconds = time.perf_counter() - start
    return report, left_fp32


class _Rewrite:
    """The graph's rewrite in progress: the replacement nodes per replaced MatMul output, the
    new initializers, the fp32 weights nothing reads afterwards, and the block sums of each
    activation (shared by the offset terms of every MatMul that reads it)."""

    def __init__(self, graph: onnx.GraphProto, block_size: int, accuracy_level: int | None,
                 int8_accuracy_level: int | None) -> None:
        self.graph, self.block_size = graph, block_size
        self.accuracy_level, self.int8_accuracy_level = accuracy_level, int8_accuracy_level
        self.inits = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.new_inits: list[onnx.TensorProto] = []
        self.new_nodes: dict[str, list[onnx.NodeProto]] = {}  # replaced output → replacement
        self.block_sums: dict[tuple[str, int], str] = {}  # (activation, K) → block-sum tensor
        self.indicator: dict[int, str] = {}  # K → the 0/1 [K, K / block_size] initializer
        self.removable: list[str] = []

    def eligible(self, report: RepackReport) -> dict[str, list[onnx.NodeProto]]:
        """MatMuls by fp32 2-D weight whose rows split into whole blocks (a weight may feed
        several); the others named in ``report.skipped``."""
        from onnx import TensorProto

        out: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            b = self.inits.get(node.input[1])
            if (b is not None and len(b.dims) == 2 and b.data_type == TensorProto.FLOAT
                    and b.dims[0] % self.block_size == 0 and self.block_size % 2 == 0):
                out.setdefault(node.input[1], []).append(node)
            else:
                report.skipped.append(node.name)
        return out

    def block_sum(self, activation: str, k: int, base: str) -> tuple[str, list[onnx.NodeProto]]:
        """The per-block sums of ``activation`` (made once per activation and K)."""
        import onnx
        from onnx import numpy_helper

        if (activation, k) in self.block_sums:
            return self.block_sums[(activation, k)], []
        if k not in self.indicator:
            e = np.zeros((k, k // self.block_size), dtype=np.float32)
            e[np.arange(k), np.arange(k) // self.block_size] = 1.0
            self.indicator[k] = f"repack.block_sum_{k}"
            self.new_inits.append(numpy_helper.from_array(e, self.indicator[k]))
        out = f"{base}_block_sum/output_0"
        self.block_sums[(activation, k)] = out
        return out, [onnx.helper.make_node("MatMul", [activation, self.indicator[k]], [out],
                                           name=f"{base}_block_sum")]

    def int4(self, wname: str, nodes: list[onnx.NodeProto], k: int, n: int, fit4: Any,
             zero_points: ZeroPoints) -> str:
        """Every MatMul of ``wname`` as 4-bit ``MatMulNBits`` on its exact Q4 grid (float
        zero points, or the default zero point plus a per-block offset term); the action."""
        import onnx
        from onnx import numpy_helper

        bs, acc = self.block_size, self.accuracy_level
        self.new_inits.append(numpy_helper.from_array(pack_nibbles(fit4.q), f"{wname}_Q4R"))
        self.new_inits.append(numpy_helper.from_array(fit4.scale.reshape(-1),
                                                      f"{wname}_scales"))
        if zero_points == "float":
            zp = (-fit4.minimum / fit4.scale).astype(np.float32)
            self.new_inits.append(numpy_helper.from_array(zp.reshape(-1), f"{wname}_zp"))
            for nd in nodes:
                self.new_nodes[nd.output[0]] = [_matmul_nbits(
                    f"{_name(nd)}_Q4R", [nd.input[0], f"{wname}_Q4R", f"{wname}_scales",
                                         f"{wname}_zp"], nd.output[0], k, n, 4, bs, acc)]
            return "int4-float-zp"
        # w = (q - 8) * scale + offset, offset = min + 8 * scale, per block
        offset = (fit4.minimum + np.float32(8) * fit4.scale).astype(np.float32)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(offset.T),
                                                      f"{wname}_offset"))  # [nb, N]
        for nd in nodes:
            base = _name(nd)
            sums, sum_nodes = self.block_sum(nd.input[0], k, base)
            main, corr = f"{base}_Q4R/output_0", f"{base}_offset/output_0"
            self.new_nodes[nd.output[0]] = [
                *sum_nodes,
                _matmul_nbits(f"{base}_Q4R", [nd.input[0], f"{wname}_Q4R", f"{wname}_scales"],
                              main, k, n, 4, bs, acc),
                onnx.helper.make_node("MatMul", [sums, f"{wname}_offset"], [corr],
                                      name=f"{base}_offset"),
                onnx.helper.make_node("Add", [main, corr], [nd.output[0]],
                                      name=f"{base}_offset_add"),
            ]
        return "int4-offset"

    def int8(self, wname: str, nodes: list[onnx.NodeProto], k: int, n: int, fit8: Any) -> None:
        """Every MatMul of ``wname`` as 8-bit ``MatMulNBits`` on its exact Q8 grid."""
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(fit8.q, f"{wname}_Q8R"))
        self.new_inits.append(numpy_helper.from_array(fit8.scale.reshape(-1),
                                                      f"{wname}_scales"))
        for nd in nodes:  # no zero_points input: the 8-bit default is 128
            self.new_nodes[nd.output[0]] = [_matmul_nbits(
                f"{_name(nd)}_Q8R", [nd.input[0], f"{wname}_Q8R", f"{wname}_scales"],
                nd.output[0], k, n, 8, self.block_size, self.int8_accuracy_level)]

    def drop_if_unread(self, wname: str) -> None:
        """The fp32 weight goes unless something else reads it (a tied embedding's Gather,
        a graph output)."""
        others = [c for c in self.consumers.get(wname, [])
                  if not (c.op_type == "MatMul" and c.output[0] in self.new_nodes)]
        if not others and wname not in {o.name for o in self.graph.output}:
            self.removable.append(wname)


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
    copy_sidecars(src_dir, dst_dir)
    report.seconds = time.perf_counter() - start
    (dst_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
    if log is not None:
        log(f"repacked {src_dir.name}: {report.summary()}")
    return dst
