"""Expected answer lengths: how much of ``max_tokens`` requests of a class actually use.

``max_tokens`` is an upper bound: an answer ends at its end-of-sequence token, usually sooner
(the route bench's chat answers used 78 % of it). Pricing every row at its bound overstates how
long a batch keeps running and so how much a row joining it costs once the others would have
left. The router therefore prices **energy** over the expected length and keeps the bound for
**latency** (a budget must hold if the answer runs to its bound).

A class is the request's ``max_tokens`` rounded up to a power of two (a client asking 64 and
one asking 1024 write different answers). Each class learns the fraction of its bound that
finished answers used (``stop`` or ``length``; cancelled, failed and energy-capped ones say
nothing about length), as a moving average; until ``min_observations`` answers have ended the
fraction is 1, the bound. A running row's expected tokens left are its class's expected length
less what it has produced, at least one while it runs (an answer already past its expectation
is expected to end soon, not to have ended), never more than its bound. No I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def length_class(max_tokens: int) -> int:
    """The power of two at or above ``max_tokens`` (1 for 0 or 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, max_tokens))))


@dataclass
class LengthModel:
    """Per class, the fraction of ``max_tokens`` answers used (see the module doc)."""

    alpha: float = 0.1
    min_observations: int = 4
    _fraction: dict[int, float] = field(default_factory=dict)
    _count: dict[int, int] = field(default_factory=dict)

    def observe(self, max_tokens: int, produced: int) -> None:
        """An answer bounded by ``max_tokens`` ended (stop or length) after ``produced``."""
        if max_tokens < 1 or produced < 0:
            return
        c = length_class(max_tokens)
        used = min(1.0, produced / max_tokens)
        n = self._count.get(c, 0)
        old = self._fraction.get(c, used)
        # the first answers average plainly, later ones move the average by alpha
        weight = max(self.alpha, 1.0 / (n + 1))
        self._fraction[c] = old + weight * (used - old)
        self._count[c] = n + 1

    def fraction(self, max_tokens: int) -> float:
        """The expected share of the bound (1.0 until the class has enough answers)."""
        c = length_class(max_tokens)
        if self._count.get(c, 0) < self.min_observations:
            return 1.0
        return self._fraction[c]

    def expected(self, max_tokens: int) -> int:
        """Expected tokens of a new answer bounded by ``max_tokens`` (1 .. the bound)."""
        return max(1, min(max_tokens, round(self.fraction(max_tokens) * max_tokens)))

    def expected_left(self, max_tokens: int, produced: int) -> int:
        """Expected tokens still to come from a running answer (1 .. its bound's left)."""
        bound_left = max(0, max_tokens - produced)
        if bound_left == 0:
            return 0
        return max(1, min(bound_left, self.expected(max_tokens) - produced))

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        return {str(c): {"fraction": round(self._fraction[c], 4), "answers": self._count[c]}
                for c in sorted(self._fraction)}
