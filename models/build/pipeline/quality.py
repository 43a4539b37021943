"""Quality of a variant on held-out text: perplexity and next-token agreement with ``full``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from models.runtime.engine.ort import OrtEngine


@dataclass(frozen=True)
class QualityReport:
    perplexity: float
    argmax: np.ndarray  # predicted next token at every evaluated position
    tokens: int


def heldout_ids(tokenizer: Tokenizer, path: Path, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of the held-out file."""
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    if len(ids) < 2:
        raise ValueError(f"held-out text {path} has fewer than 2 tokens")
    return list(ids[:max_tokens])


def evaluate(engine: OrtEngine, ids: list[int], window: int) -> QualityReport:
    """Perplexity over non-overlapping ``window``-token chunks (each chunk from an empty cache)."""
    nll = 0.0
    count = 0
    argmax: list[np.ndarray] = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = engine.logits(chunk[:-1]).astype(np.float64)
        targets = np.asarray(chunk[1:])
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll -= float(logprobs[np.arange(len(targets)), targets].sum())
        count += len(targets)
        argmax.append(logits.argmax(axis=-1))
    return QualityReport(float(np.exp(nll / count)), np.concatenate(argmax), count)


def agreement(variant: QualityReport, reference: QualityReport) -> float:
    """Fraction of positions where the variant's top-1 next token equals the reference's."""
    return float(np.mean(variant.argmax == reference.argmax))
