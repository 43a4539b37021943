"""Next-token selection from logits in numpy: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import numpy as np

from models.engine.base import GenerationParams


def make_rng(seed: int | None) -> np.random.Generator:
    """A private generator per request, so a seed reproduces its sample whatever else runs."""
    return np.random.default_rng(seed)


def select_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """Pick one token id from a 1-D logits vector."""
    if params.greedy:
        return int(np.argmax(logits))
    # shifted by the maximum before dividing: (logit - max) / T is <= 0, so a tiny temperature
    # gives -inf (probability 0) instead of inf - inf = NaN
    raw = logits.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        scaled = (raw - raw.max()) / params.temperature
    if params.top_k and params.top_k < scaled.shape[0]:
        candidates = np.argpartition(scaled, -params.top_k)[-params.top_k :]
    else:
        candidates = np.arange(scaled.shape[0])
    cand_logits = scaled[candidates]
    order = np.argsort(cand_logits)[::-1]
    candidates, cand_logits = candidates[order], cand_logits[order]
    probs = np.exp(cand_logits - cand_logits[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        candidates, probs = candidates[:keep], probs[:keep]
        probs = probs / probs.sum()
    return int(candidates[rng.choice(len(candidates), p=probs)])
