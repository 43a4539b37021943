"""Splitting one window's energy between the requests that shared it (batching).

Each request gets the window's joules in proportion to the tokens it processed in it (prompt +
generated): the work, not the wall time, drew the power. The energy ledger
(:mod:`telemetry.ledger`) applies this to every step interval of a continuous batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

K = TypeVar("K")


def split_by_tokens(joules: float, tokens: Mapping[K, int]) -> dict[K, float]:
    """``joules`` shared out by ``tokens`` per request; equal shares when no tokens were
    counted; the shares always add up to ``joules``."""
    if joules < 0:
        raise ValueError("joules must be >= 0")
    if any(n < 0 for n in tokens.values()):
        raise ValueError("token counts must be >= 0")
    if not tokens:
        return {}
    total = sum(tokens.values())
    if total == 0:
        return {k: joules / len(tokens) for k in tokens}
    return {k: joules * n / total for k, n in tokens.items()}
