"""Next-token selection from logits in numpy: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import numpy as np

from models.runtime.engine.base import GenerationParams


def make_rng(seed: int | None) -> np.random.Generator:
    """A private generator per request, so a seed reproduces its sample whatever else runs."""
    return np.random.default_rng(seed)


_NUCLEUS_PREFIX = 256  # top-p: sort only this many best tokens when they hold the mass
_CDF_BLOCK = 256  # plain sampling: the inverse CDF walks block sums, then one block


def _plain(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Plain temperature sampling: the inverse CDF over 256-token block sums, then within one
    block; float32 and in place (three passes over the vocabulary, no sort, no float64 copy).
    A temperature so small that 1/T overflows float32 is greedy (its limit), exactly."""
    inverse = 1.0 / temperature
    if not inverse < 3.0e38:
        return int(np.argmax(logits))
    w = logits.astype(np.float32, copy=True)
    w -= w.max()
    with np.errstate(over="ignore", under="ignore"):
        w *= np.float32(inverse)  # <= 0, possibly -inf: exp gives 0, never NaN
    np.exp(w, out=w)
    vocab = w.shape[0]
    starts = np.arange(0, vocab, _CDF_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    u = rng.random() * block_cdf[-1]
    block = min(int(np.searchsorted(block_cdf, u, side="right")), len(starts) - 1)
    inner = np.cumsum(w[starts[block] : starts[block] + _CDF_BLOCK], dtype=np.float64)
    before = block_cdf[block - 1] if block else 0.0
    pos = min(int(np.searchsorted(inner, u - before, side="right")), len(inner) - 1)
    return int(starts[block] + pos)


def select_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """Pick one token id from a 1-D logits vector.

    Per token and on a 49,152-token vocabulary, so no full sort unless it is needed: plain
    temperature sampling draws from the cumulative distribution (block sums, then one block);
    top-k partitions out k candidates; top-p sorts only the best ``_NUCLEUS_PREFIX`` tokens when
    their mass already reaches ``top_p`` (the nucleus is then inside them, so the result is
    exact), else all.
    """
    if params.greedy:
        return int(np.argmax(logits))
    if (not params.top_k or params.top_k >= logits.shape[0]) and params.top_p >= 1.0:
        return _plain(logits, params.temperature, rng)
    # shifted by the maximum before dividing: (logit - max) / T is <= 0, so a tiny temperature
    # gives -inf (probability 0) instead of inf - inf = NaN
    raw = logits.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        scaled = (raw - raw.max()) / params.temperature
    vocab = scaled.shape[0]
    if params.top_k and params.top_k < vocab:
        candidates = np.argpartition(scaled, -params.top_k)[-params.top_k :]
    else:  # top-p
        candidates = np.arange(vocab)
        if vocab > _NUCLEUS_PREFIX:
            weights = np.exp(scaled)
            head = np.argpartition(scaled, -_NUCLEUS_PREFIX)[-_NUCLEUS_PREFIX:]
            if weights[head].sum() >= params.top_p * weights.sum():
                candidates = head
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


def distribution(logits: np.ndarray, params: GenerationParams) -> np.ndarray:
    """The probabilities :func:`select_token` draws from, as a float64 vector over the whole
    vocabulary (one-hot for greedy): temperature, then top-k, then the top-p nucleus.
    Speculative decoding's acceptance test compares two of these."""
    vocab = logits.shape[0]
    out = np.zeros(vocab, dtype=np.float64)
    if params.greedy:
        out[int(np.argmax(logits))] = 1.0
        return out
    raw = logits.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        scaled = (raw - raw.max()) / params.temperature
    if params.top_k and params.top_k < vocab:
        keep = np.argpartition(scaled, -params.top_k)[-params.top_k :]
        masked = np.full(vocab, -np.inf)
        masked[keep] = scaled[keep]
        scaled = masked
    weights = np.exp(scaled)
    probs = weights / weights.sum()
    if params.top_p < 1.0:
        order = np.argsort(probs)[::-1]
        keep_n = int(np.searchsorted(np.cumsum(probs[order]), params.top_p) + 1)
        out[order[:keep_n]] = probs[order[:keep_n]]
        return out / out.sum()
    return probs


def sample_from(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector (inverse CDF: no per-token sort)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
