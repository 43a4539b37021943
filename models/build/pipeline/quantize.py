"""8-bit (and 4-bit) quantization candidates for an exported fp32 decoder.

Four families, chosen between by measurement in :mod:`models.build.pipeline.build`:
``dynamic-int8`` (``MatMulInteger`` with activations quantized at run time, one scale per
tensor), ``w8a8`` (the same kernel with one activation scale per row), weight-only
``MatMulNBits`` (block-wise int8/int4 weights; compute in int8 with ``accuracy_level=4``) and
``rowquant``, greenroute's own operator (``kernels/``: activations quantized per row inside the
operator to 8 or up to 16 bits, exact int32 sums on AVX2 and VNNI), raced where its library is
built.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.build.pipeline.export import ONNX_FILE, copy_sidecars
from models.build.pipeline.repack import repack_q4_blocks


@dataclass(frozen=True)
class QuantMethod:
    """One quantization recipe; ``name`` is what the manifest records."""

    name: str
    family: str  # "dynamic", "nbits", "w8a8", "rowquant", "q4repack" or "q4repack-offset"
    bits: int
    block_size: int = 32
    accuracy_level: int | None = 4
    keep_fp32: tuple[str, ...] = ()  # w8a8, rowquant: MatMul names holding these stay fp32
    act_bits: int = 8  # rowquant: activations to int8, or as fine as int16 and K allow

    @property
    def precision(self) -> str:
        return f"int{self.bits}"


# Larger blocks carry fewer scales and quantize the activations in longer runs: on SmolLM2-135M
# (2 threads, AVX-512 VNNI) block 32 / 64 / 128 / 256 decoded at 2.27 / 2.61 / 2.77 / 2.78x fp32
# with quality 0.995 / 0.994 / 0.987 / 0.979; 256 buys nothing over 128 and is not raced.
# int8 weights per column, activations per row at run time (models.build.pipeline.w8a8): the
# u8s8 QGEMM of the dynamic family (which scaled best with rows where the CPU has AMX: 1130
# against 526 tok/s at 16 rows for MatMulNBits block 64) without its per-tensor scale. On
# SmolLM2-135M (AMD EPYC, AVX-512 VNNI, no AMX; 2026-12-05) quality 0.968 with every MatMul,
# 0.984 with down_proj (and its outlier activations) left fp32; at one row 94-98 and 85-88
# tok/s (the per-row quantization is nine small ops per activation), at 16 rows 570-680 and
# 574-616, against block 128's 149-158 and 549-570 in the same run. Only the fp32-down copy
# is raced: the other fails the quality rule (within 0.02 of the best 8-bit quality).
CANDIDATE_W8A8 = QuantMethod("w8a8-rowwise-int8", "w8a8", 8, 0, None)
CANDIDATE_W8A8_KEEP_DOWN = QuantMethod("w8a8-rowwise-int8-fp32-down", "w8a8", 8, 0, None,
                                       ("down_proj",))
# greenroute's own operator (models.build.pipeline.rowquant): int8 weights per channel, the
# activations per row at 8 bits (the VNNI paths' fastest; on SmolLM2-135M quality 0.968) or as
# fine as int16 allows (free on AVX2, where both widen to int16), the tied LM head (a fifth of
# the weight bytes) quantized too or kept fp32. Raced only where kernels/ is built.
# (names start with models.runtime.kernels.METHOD_PREFIX: the loader runs them on our engine)
CANDIDATE_ROWQUANT = QuantMethod("rowquant-int8", "rowquant", 8, 0, None)
CANDIDATE_ROWQUANT_A16 = QuantMethod("rowquant-int8-a16", "rowquant", 8, 0, None, act_bits=16)
CANDIDATE_ROWQUANT_A16_FP32_HEAD = QuantMethod("rowquant-int8-a16-fp32-head", "rowquant", 8, 0,
                                               None, ("lm_head",), act_bits=16)
CANDIDATES_8BIT = (
    QuantMethod("dynamic-int8-matmulinteger", "dynamic", 8),
    QuantMethod("matmulnbits-int8-block32", "nbits", 8, 32),
    QuantMethod("matmulnbits-int8-block64", "nbits", 8, 64),
    QuantMethod("matmulnbits-int8-block128", "nbits", 8, 128),
    CANDIDATE_W8A8_KEEP_DOWN,
)


def candidates_8bit() -> tuple[QuantMethod, ...]:
    """The 8-bit race: :data:`CANDIDATES_8BIT`, and greenroute's operator where it is built."""
    from models.runtime import kernels

    own = ((CANDIDATE_ROWQUANT, CANDIDATE_ROWQUANT_A16, CANDIDATE_ROWQUANT_A16_FP32_HEAD)
           if kernels.available() else ())
    return (*CANDIDATES_8BIT, *own)


CANDIDATE_4BIT = QuantMethod("matmulnbits-int4-block32", "nbits", 4, 32)
# Exact repacking of weights that came from a Q4_1 GGUF (models.build.pipeline.repack), not a
# re-quantization: float zero points (exact, but onnxruntime's CPU kernel dequantizes the
# whole matrix on every call: ~0.2x fp32 measured, so not raced) or the default zero point plus
# a per-block fp32 offset term (raced; weights exact, activations int8 at accuracy_level 4).
CANDIDATE_Q4_REPACK = QuantMethod("matmulnbits-int4-q4repack-block32", "q4repack", 4, 32)
CANDIDATE_Q4_REPACK_OFFSET = QuantMethod("matmulnbits-int4-q4repack-offset-block32",
                                         "q4repack-offset", 4, 32)
# block 128: less quality than block 32 (0.64 against 0.78 on SmolLM2), 1.2x its speed; raced
# so that a 4-bit rung can still earn its place next to a faster int8 rung
CANDIDATES_4BIT = (CANDIDATE_4BIT, QuantMethod("matmulnbits-int4-block128", "nbits", 4, 128),
                   CANDIDATE_Q4_REPACK_OFFSET)


def quantize(src_dir: Path, dst_dir: Path, method: QuantMethod) -> Path:
    """Quantize ``src_dir/model.onnx`` into ``dst_dir/model.onnx`` with ``method``."""
    if method.family in ("q4repack", "q4repack-offset"):
        return repack_q4_blocks(src_dir, dst_dir, method.block_size, method.accuracy_level,
                                zero_points="float" if method.family == "q4repack" else "offset")
    if method.family == "w8a8":
        from models.build.pipeline.w8a8 import quantize_w8a8

        return quantize_w8a8(src_dir, dst_dir, method.keep_fp32)
    if method.family == "rowquant":
        from models.build.pipeline.rowquant import quantize_rowquant

        return quantize_rowquant(src_dir, dst_dir, method.keep_fp32, method.act_bits)
    import onnx

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    src, dst = src_dir / ONNX_FILE, dst_dir / ONNX_FILE
    if method.family == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # reduce_range: 7-bit weights, so AVX2's saturating u8 x s8 pairs stay exact (w8a8.py)
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                         reduce_range=True, weight_type=QuantType.QInt8)
    elif method.family == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=method.bits,
            block_size=method.block_size,
            is_symmetric=True,
            accuracy_level=method.accuracy_level,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:  # pragma: no cover - closed set above
        raise ValueError(f"unknown quantization family {method.family}")
    copy_sidecars(src_dir, dst_dir)
    return dst
