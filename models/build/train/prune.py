"""Depth pruning maths (numpy; build time only): which run of blocks to drop, and the linear
bridge that may stand in for them.

A decoder's residual stream changes little across some runs of blocks ("The Unreasonable
Ineffectiveness of the Deeper Layers", Gromov et al. 2024). Which run of ``n`` blocks to drop
is measured by the loss of the cut on in-domain text (:mod:`models.build.train.students`); the
angular distance between the run's input and output hidden states is recorded beside it. The
first and the last block are always kept. Where a run is dropped, the last kept block's MLP
output ``m`` (``h = r + m``, ``r`` the residual after its attention) can be mapped by a
least-squares linear transform ``T`` so that ``r + m T`` approximates the hidden state the
dropped run would have produced (ReplaceMe, Shopkhoev et al. 2025). ``T`` folds into that MLP's
``down_proj`` weight, so the student keeps the teacher's architecture and every exporter still
understands it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gap:
    """Teacher blocks ``start .. start + length - 1`` are dropped."""

    start: int
    length: int
    distance: float  # angular distance between the run's input and output (0-1)

    def kept(self, total: int) -> list[int]:
        return [b for b in range(total) if not self.start <= b < self.start + self.length]


def angular_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tokens of ``arccos(cos(a_t, b_t)) / pi``: 0 when every pair points the same
    way, 1 when opposite. ``a`` and ``b`` are ``[tokens, hidden]``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
                                 + 1e-12)
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0))) / np.pi)


def gap_distances(hidden: list[np.ndarray], length: int) -> dict[int, float]:
    """For every allowed start, the angular distance across a run of ``length`` blocks.

    ``hidden[i]`` is the input of block ``i`` (``hidden[0]`` the embeddings), for every block
    of the teacher. The first block and the last are always kept: a run may start at 1 and must
    end before the last block."""
    total = len(hidden)
    if not 1 <= length <= total - 2:
        raise ValueError(f"can drop 1 to {total - 2} of {total} blocks, not {length}")
    return {s: angular_distance(hidden[s], hidden[s + length])
            for s in range(1, total - length)}


def fit_bridge(mlp_out: np.ndarray, residual: np.ndarray, target: np.ndarray,
               ridge: float = 1e-4) -> np.ndarray:
    """``T`` minimising ``||residual + mlp_out @ T - target||^2 + ridge * ||T - I||^2 * scale``.

    The ridge pulls ``T`` towards the identity (no bridge: the plain cut), scaled by the mean
    diagonal of ``mlp_out^T mlp_out`` so that it does not depend on the activations' size.
    All arrays are ``[tokens, hidden]``."""
    m = mlp_out.astype(np.float64)
    y = (target - residual).astype(np.float64)
    gram = m.T @ m
    lam = ridge * float(np.trace(gram)) / gram.shape[0]
    eye = np.eye(gram.shape[0])
    return np.linalg.solve(gram + lam * eye, m.T @ y + lam * eye).astype(np.float32)


def fold_bridge(down_proj_weight: np.ndarray, bridge: np.ndarray) -> np.ndarray:
    """The ``down_proj`` weight (``[hidden, intermediate]``, as torch's ``Linear`` stores it)
    whose output is the old output times ``bridge``: ``(z W^T) T = z (T^T W)^T``."""
    return (bridge.T.astype(np.float64) @ down_proj_weight.astype(np.float64)).astype(
        down_proj_weight.dtype)


def residual_error(mlp_out: np.ndarray, residual: np.ndarray, target: np.ndarray,
                   bridge: np.ndarray | None) -> float:
    """Squared error of the bridged (or plain, ``None``) cut relative to ``target``'s own."""
    out = residual + (mlp_out if bridge is None else mlp_out @ bridge)
    return float(np.sum((out - target) ** 2) / (np.sum(target.astype(np.float64) ** 2) + 1e-30))
