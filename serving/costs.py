"""What the lane's forwards cost, as the lane hands it on (:mod:`serving.lane`): each row's
share of the device's energy (the ledger, by the work each row pushed through a forward), and
the router's observations of step and prefill times by width and of each settled interval's
joules, priced to the forwards in it."""

from __future__ import annotations

from collections.abc import Sequence

from routing.router import Router
from telemetry.ledger import PREFILL, EnergyLedger


class ForwardCosts:
    """The lane's cost bookkeeping: one per lane, used on its thread only."""

    def __init__(self, ledger: EnergyLedger, router: Router) -> None:
        self.ledger = ledger
        self.router = router
        # the forwards since the ledger last settled: (variant, width (0: a prefill), seconds)
        self._forwards: list[tuple[str, int, float]] = []

    def step(self, variant: str, width: int, seconds: float, ids: Sequence[str],
             work: Sequence[int], tokens_per_row: float, switched: bool,
             own: float = 1.0) -> None:
        """A decode step over ``width`` rows: its ms per token (a speculative round gives a
        row several; ``own``: the part of the forward's time that was this variant's rows,
        the rest another rung's riding rows), each row's share, the forward for the next
        settle (all of its time: the device's power is the device's whoever's rows ran)."""
        self.router.observe_step(variant, width, 1000 * seconds * own / tokens_per_row,
                                 switched=switched)
        for request, done in zip(ids, work, strict=True):
            self.ledger.record(request, done)
        self._forwards.append((variant, width, seconds))

    def prefill(self, variant: str, request: str, tokens: int, seconds: float) -> None:
        self.router.observe_prefill(variant, tokens, 1000 * seconds)
        self.ledger.record(request, tokens, PREFILL)
        self._forwards.append((variant, 0, seconds))

    def settle(self) -> None:
        """Settle the ledger; the interval's joules price its forwards (variant and width),
        shared by time where a slow counter's interval holds several (the update's work
        between forwards is part of what a step costs)."""
        if (settled := self.ledger.settle()) is None:
            return
        busy = sum(seconds for _, _, seconds in self._forwards) or 1.0
        for variant, width, seconds in self._forwards:
            self.router.observe_energy(variant, width, settled[0] * seconds / busy, seconds)
        self._forwards.clear()

    def idle(self) -> None:
        """The lane ran dry: idle time is nobody's."""
        if self.ledger.is_open:
            self.ledger.close()
            self._forwards.clear()
