"""The energy ledger: each interval's joules shared by tokens; busy time only; sums conserved."""

from __future__ import annotations

import pytest

from telemetry.ledger import GENERATION, PREFILL, EnergyLedger
from tests.telemetry.fakes import CounterMeter


def test_an_interval_is_shared_by_tokens_and_idle_is_nobodys() -> None:
    meter = CounterMeter()
    ledger = EnergyLedger(meter)
    ledger.open()
    ledger.record("a", 30)  # a prefill of 30 tokens...
    ledger.record("b", 1)  # ...and b's decode token, in one interval
    meter.total += 6.2
    assert ledger.settle() == (6.2, pytest.approx(ledger.busy_seconds))
    assert ledger.joules("a") == pytest.approx(6.0) and ledger.joules("b") == pytest.approx(0.2)
    ledger.close()
    meter.total += 100.0  # idle: the lane has no work
    ledger.open()
    ledger.record("b", 1)
    meter.total += 1.0
    assert ledger.take("b") == pytest.approx(1.2)
    assert ledger.take("a") == pytest.approx(6.0)
    assert ledger.busy_joules == pytest.approx(7.2)


def test_unsettled_tokens_are_estimated_at_the_latest_rate() -> None:
    meter = CounterMeter()
    ledger = EnergyLedger(meter, min_interval_s=3600)  # a counter that has not moved yet
    ledger.open()
    ledger.record("a", 10)
    meter.total += 5.0
    ledger.settle(force=True)  # 0.5 J per token
    ledger.record("a", 4)
    assert ledger.settle() is None  # too young
    assert ledger.joules("a") == pytest.approx(7.0)


def test_a_sequence_leaving_a_young_interval_keeps_the_sum_whole() -> None:
    """On a slow counter a departing sequence is charged at the latest rate and the interval's
    energy, when it settles, goes to the others less that credit: the sum is the device's."""
    meter = CounterMeter()
    ledger = EnergyLedger(meter, min_interval_s=3600)
    ledger.open()
    for key in "abc":
        ledger.record(key, 10)
    meter.total += 3.0
    ledger.settle(force=True)  # 0.1 J per token
    for key in "abc":
        ledger.record(key, 5)
    a = ledger.take("a")  # young interval: 1.0 J settled + 5 tokens x 0.1 J estimated
    assert a == pytest.approx(1.5)
    meter.total += 2.5  # the interval really cost 2.5 J: b and c share 2.0
    ledger.close()
    b, c = ledger.take("b"), ledger.take("c")
    assert b == pytest.approx(2.0) and c == pytest.approx(2.0)
    assert a + b + c == pytest.approx(ledger.busy_joules) == pytest.approx(5.5)


def test_energy_settled_with_no_tokens_is_kept_apart() -> None:
    meter = CounterMeter()
    ledger = EnergyLedger(meter)
    ledger.open()
    meter.total += 2.0
    ledger.settle()
    assert ledger.unattributed_joules == pytest.approx(2.0)
    with pytest.raises(ValueError):
        EnergyLedger(meter, min_interval_s=-1)


def test_a_sequences_prompt_and_generated_tokens_are_charged_apart_and_add_up() -> None:
    """Prefill and generation shares of one sequence, across intervals shared with another:
    each phase gets its tokens' share, and the phases add up to the sequence's joules."""
    meter = CounterMeter()
    ledger = EnergyLedger(meter)
    ledger.open()
    ledger.record("a", 20, PREFILL)
    ledger.record("b", 1)
    meter.total += 4.2  # 0.2 J a token
    ledger.settle()
    ledger.record("a", 1)
    ledger.record("b", 1)
    meter.total += 1.0  # 0.5 J a token
    ledger.settle()
    assert ledger.joules("a", PREFILL) == pytest.approx(4.0)
    assert ledger.joules("a", GENERATION) == pytest.approx(0.5)
    reading = ledger.reading("a", 2.0)
    assert reading.prefill_joules == pytest.approx(4.0)
    assert reading.generation_joules == pytest.approx(0.5)
    assert reading.joules == pytest.approx(4.5)
    assert ledger.take_phases("b") == {PREFILL: 0.0, GENERATION: pytest.approx(0.7)}
    assert ledger.busy_joules == pytest.approx(4.5 + 0.7)
