"""The sampler draws each token with its softmax probability on every path (plain temperature,
top-k, top-p with the sorted-prefix shortcut and without it)."""

from __future__ import annotations

import numpy as np
import pytest

from models.runtime.engine.base import GenerationParams
from models.runtime.engine.sampling import _NUCLEUS_PREFIX, make_rng, select_token


def _softmax(x: np.ndarray) -> np.ndarray:
    p = np.exp(x - x.max())
    return p / p.sum()


def _chi2(counts: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def _draw(logits: np.ndarray, params: GenerationParams, n: int) -> np.ndarray:
    rng = make_rng(11)
    return np.bincount([select_token(logits, params, rng) for _ in range(n)],
                       minlength=len(logits))


# vocab of 1,000 (several 256-token blocks and a partial last one); fixed seeds. A correct sampler
# gives chi-square near the degrees of freedom (sd sqrt(2 dof)); the bound, dof + 6 sd, fails for
# a wrong distribution (e.g. one block skipped or off by one token) by orders of magnitude.
LOGITS = (np.random.default_rng(5).standard_normal(1000) * 2.5).astype(np.float32)
N = 60_000


def test_plain_temperature_matches_the_softmax() -> None:
    p = _softmax(LOGITS.astype(np.float64) / 0.8)
    counts = _draw(LOGITS, GenerationParams(temperature=0.8), N)
    dof = int((p > 0).sum()) - 1
    assert _chi2(counts, N * p) < dof + 6 * np.sqrt(2 * dof)


@pytest.mark.parametrize("top_p", [0.3, 0.999])  # the nucleus inside / beyond the sorted prefix
def test_top_p_matches_the_renormalised_nucleus(top_p: float) -> None:
    p = _softmax(LOGITS.astype(np.float64))
    order = np.argsort(p)[::-1]
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    counts = _draw(LOGITS, GenerationParams(temperature=1.0, top_p=top_p), N)
    assert counts[q == 0].sum() == 0  # nothing outside the nucleus
    dof = max(1, len(keep) - 1)
    assert _chi2(counts, N * q) < dof + 6 * np.sqrt(2 * dof)
    assert (len(keep) <= _NUCLEUS_PREFIX) == (top_p == 0.3)


def test_plain_sampling_is_seeded() -> None:
    params = GenerationParams(temperature=1.0)
    a = [select_token(LOGITS, params, make_rng(4)) for _ in range(5)]
    b = [select_token(LOGITS, params, make_rng(4)) for _ in range(5)]
    rng = make_rng(4)
    c = [select_token(LOGITS, params, rng) for _ in range(50)]
    assert a == b and len(set(c)) > 5
