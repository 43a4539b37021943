"""The energy ledger: the device's energy over each interval, split among the sequences that
ran in it by tokens processed (prompt tokens included); a request's joules are its shares' sum.

The lane records tokens per sequence as it runs forwards and *settles* an interval by reading
the meter once: the interval's joules (the counter's difference) go to that interval's
sequences in proportion to their tokens. It settles after every forward when the meter is cheap
to read and fine-grained (RAPL, the estimate), and at most every ``min_interval_s`` otherwise
(an NVML counter moves every 20-100 ms). A sequence that ends settles the interval when it is
old enough; otherwise (a slow counter) its unsettled tokens are charged at the latest settled
rate and that credit is deducted from the interval's energy when it settles, so the other
sequences are charged the rest and the sum still holds. Only busy time is charged: the ledger
is opened when the lane starts work and closed when it runs dry, and the idle power in between
belongs to no request.

Conservation holds by construction: over a busy period, the per-sequence joules add up to the
device joules over the lane's run time (less anything settled while no tokens were recorded,
kept in ``unattributed_joules``).
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from telemetry.attribution import split_by_tokens
from telemetry.base import EnergyMeter, EnergyReading

SHARE_NOTE = "ledger share of the device's energy, split by tokens among the rows of each step"
PREFILL, GENERATION = "prefill", "generation"  # what a sequence's tokens were doing: its
# prompt's forward, or generating (a speculative row's drafted and verified positions too)
PHASES = (PREFILL, GENERATION)


class EnergyLedger:
    """Not thread-safe: owned by one lane thread."""

    def __init__(self, meter: EnergyMeter, min_interval_s: float = 0.0) -> None:
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        self.meter = meter
        self.min_interval_s = min_interval_s
        self._open = False
        self._last_j = 0.0
        self._last_t = 0.0
        self._pending: dict[tuple[Hashable, str], int] = {}  # (sequence, phase) → tokens
        self._joules: dict[tuple[Hashable, str], float] = {}
        self.j_per_token = 0.0  # the latest settled interval's joules per token
        self.busy_joules = 0.0  # device joules over every busy interval settled
        self.busy_seconds = 0.0
        self.unattributed_joules = 0.0  # settled while no tokens were pending (negative: a
        # departed sequence's credit exceeded what its interval turned out to cost)
        self._credited = 0.0  # charged to departed sequences out of the open interval

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        """The lane starts work: the next interval begins now."""
        if not self._open:
            self._last_j, self._last_t = self.meter.total_joules(), time.perf_counter()
            self._open = True

    def record(self, key: Hashable, tokens: int, phase: str = GENERATION) -> None:
        """``key`` processed ``tokens`` in the current interval, in ``phase``."""
        k = (key, phase)
        self._pending[k] = self._pending.get(k, 0) + tokens
        self._joules.setdefault(k, 0.0)

    def settle(self, force: bool = False) -> tuple[float, float] | None:
        """Close the current interval (unless it is younger than ``min_interval_s`` and not
        ``force``d) and share out its energy. Returns (joules, seconds) when it settled."""
        if not self._open:
            return None
        now = time.perf_counter()
        if not force and now - self._last_t < self.min_interval_s:
            return None
        total = self.meter.total_joules()
        joules, seconds = max(0.0, total - self._last_j), now - self._last_t
        self._last_j, self._last_t = total, now
        self.busy_joules += joules
        self.busy_seconds += seconds
        rest, self._credited = joules - self._credited, 0.0
        if self._pending and rest >= 0:
            for key, share in split_by_tokens(rest, self._pending).items():
                self._joules[key] += share
            self.j_per_token = rest / max(1, sum(self._pending.values()))
            self._pending.clear()
        else:
            self.unattributed_joules += rest
            self._pending.clear()
        return joules, seconds

    def close(self) -> None:
        """The lane has run dry: settle what is pending; from the last settlement (the end of
        the last forward's update) until :meth:`open`, the time is idle and nobody's."""
        if self._pending:
            self.settle(force=True)
        self._open = False

    def joules(self, key: Hashable, phase: str | None = None) -> float:
        """``key``'s joules so far (in ``phase``, or all): settled shares, plus its unsettled
        tokens at the latest settled rate (an estimate until the next settlement)."""
        return sum(self._joules.get((key, p), 0.0) + self._pending.get((key, p), 0)
                   * self.j_per_token for p in ((phase,) if phase else PHASES))

    def take(self, key: Hashable) -> float:
        """Remove ``key`` and return its final joules (see the module doc for a young
        interval on a slow counter)."""
        return sum(self.take_phases(key).values())

    def take_phases(self, key: Hashable) -> dict[str, float]:
        """:meth:`take`, by phase."""
        if (any((key, p) in self._pending for p in PHASES)
                and time.perf_counter() - self._last_t >= self.min_interval_s):
            self.settle(force=True)
        out = {}
        for p in PHASES:
            credit = self._pending.pop((key, p), 0) * self.j_per_token
            self._credited += credit
            out[p] = self._joules.pop((key, p), 0.0) + credit
        return out

    def reading(self, key: Hashable, seconds: float) -> EnergyReading:
        """:meth:`take` ``key``'s joules as a reading over its ``seconds`` on the device (its
        prompt's share apart), labelled with the meter's source and a note of how the number
        came about."""
        phases = self.take_phases(key)
        joules = sum(phases.values())
        m = self.meter
        own = m.note(joules, seconds)
        return EnergyReading(joules, seconds, m.source, m.device, m.estimated,
                             f"{SHARE_NOTE}; {own}" if own else SHARE_NOTE,
                             prefill_joules=phases[PREFILL])
