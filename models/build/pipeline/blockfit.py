"""Fitting weight blocks to 4- and 8-bit grids (numpy, vectorized over the whole tensor): the
maths behind :mod:`models.build.pipeline.repack`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def fit_q4_checked(weight: np.ndarray, block_size: int,
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
