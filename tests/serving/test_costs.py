"""The lane's cost bookkeeping: what the router learns of a step, and the ledger's shares."""

from __future__ import annotations

import pytest

from routing.cost import CostModel
from routing.router import Router
from serving.costs import ForwardCosts
from telemetry.ledger import EnergyLedger
from tests.telemetry.fakes import CounterMeter


def test_a_round_that_carried_riders_teaches_the_router_its_own_share_only() -> None:
    """A speculative round of 40 ms whose draft steps also carried another rung's rows (a
    quarter of the work): the rung's table learns 30 ms; the riders' requests are charged
    their share of the interval's joules, and the power learned is the whole forward's."""
    router = Router({"spec": 1.0}, {"spec": CostModel(0.1, 30.0, 10.0, alpha=1.0)})
    meter = CounterMeter()
    ledger = EnergyLedger(meter)
    ledger.open()
    costs = ForwardCosts(ledger, router)
    costs.step("spec", 1, 0.040, ["a"], [3], 1.0, switched=False, own=0.75)
    ledger.record("rider", 1)
    meter.total += 2.0
    costs.settle()
    assert router.step_ms("spec", 1) == pytest.approx(30.0)
    assert ledger.joules("a") == pytest.approx(1.5) and ledger.joules("rider") == pytest.approx(0.5)
    learned = router.coefficients()["spec"]["watts_by_rows"]
    assert learned[0] == pytest.approx(2.0 / 0.040)  # type: ignore[index]
