"""The cost model: a step table by batch width, switch overhead kept apart, prefill and power."""

from __future__ import annotations

import numpy as np
import pytest

from routing.cost import CostModel
from routing.policy import Budget, VariantState, decide


def test_the_table_is_seeded_from_measured_widths_and_interpolated() -> None:
    # int8-like: the second row costs a kernel switch, later rows little
    m = CostModel(1.0, 8.0, 10.0, widths={2: 14.0, 4: 16.0, 16: 28.0}, max_rows=16)
    assert m.step_ms(0) == 0.0
    assert m.step_ms(1) == pytest.approx(8.0)
    assert m.step_ms(2) == pytest.approx(14.0)
    assert m.step_ms(3) == pytest.approx(15.0)  # between measured widths: linear
    assert m.step_ms(10) == pytest.approx(22.0)
    assert m.step_ms(20) == pytest.approx(32.0)  # beyond: the last segment's slope (1 ms/row)
    assert m.table(4) == pytest.approx([8.0, 14.0, 15.0, 16.0])


def test_each_width_learns_its_own_entry_and_the_table_stays_monotonic() -> None:
    m = CostModel(1.0, 5.0, 10.0, step_ms_per_row=1.0, max_rows=8)
    for k in range(300):  # the host: 20 ms for one row, 35 for two, +1 per row after
        rows = 1 + k % 8
        m.observe_step(rows, 20.0 if rows == 1 else 35.0 + (rows - 2))
    assert m.decode_ms_per_token == pytest.approx(20.0, rel=0.02)
    assert m.step_ms(2) == pytest.approx(35.0, rel=0.02)  # not a straight line through 1
    assert m.step_ms(8) == pytest.approx(41.0, rel=0.02)
    assert m.observations == 300
    # a noisy fast reading at a wide step never makes it cheaper than a narrower one
    for _ in range(20):
        m.observe_step(6, 1.0)
    table = m.table(8)
    assert all(a <= b for a, b in zip(table, table[1:], strict=False))


def test_a_narrow_step_dearer_than_wider_entries_keeps_the_per_row_increments() -> None:
    """A narrow width observed above wider entries (a speculative round, say) lifts them while
    each row past another still adds half the seeded increment (lifted flat, widths 2..15 cost
    the same and a row joining that batch looked free); a wide step observed below narrower
    entries lowers them alike."""
    c = CostModel(0.1, 20.0, 10.0, widths={16: 50.0})  # 2 ms a row
    for _ in range(30):
        c.observe_step(2, 90.0)
    lifted = c.table(16)
    assert lifted[1] == pytest.approx(90.0, rel=0.01)
    increments = np.diff(lifted[1:])
    assert np.all(increments >= 1.0 - 1e-9) and lifted[15] >= lifted[1] + 14 * 1.0 - 1e-6
    for _ in range(30):
        c.observe_step(8, 40.0)
    low = c.table(16)
    assert low[7] == pytest.approx(40.0, rel=0.01)
    assert np.all(np.diff(low[:8]) >= 1.0 - 1e-9) and low[0] >= 0.0


def test_switched_steps_teach_the_switch_cost_and_leave_the_table_alone() -> None:
    m = CostModel(1.0, 10.0, 10.0, widths={4: 13.0}, max_rows=8)
    for _ in range(100):  # every step after another variant's takes 4 ms more
        m.observe_switch(4, 17.0)
    assert m.switch_ms == pytest.approx(4.0, rel=0.02)
    assert m.step_ms(4) == pytest.approx(13.0)
    assert m.decode_ms_per_token == pytest.approx(10.0)


def test_prefill_and_power_observations() -> None:
    m = CostModel(prefill_ms_per_token=1.0, decode_ms_per_token=5.0, watts=10.0)
    for _ in range(60):  # 100 prompt tokens in 5 + 100 x 2 ms; 15 W
        m.observe_prefill(100, 205.0)
        m.observe_energy(1, 1.5, 0.1)
    assert m.prefill_ms_per_token == pytest.approx(2.0, rel=0.01)
    assert m.watts == pytest.approx(15.0, rel=0.01)


def test_a_copy_learns_independently() -> None:
    m = CostModel(1.0, 10.0, 10.0)
    c = m.copy()
    c.observe_step(1, 50.0)
    assert m.step_ms(1) == pytest.approx(10.0)
    assert c.step_ms(1) > 10.0


def test_a_variant_that_becomes_slow_loses_traffic() -> None:
    fast = CostModel(0.5, 2.0, 10.0)
    slow = CostModel(0.5, 4.0, 10.0)
    vs = [VariantState("a", 0.9, fast), VariantState("b", 0.9, slow)]
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "a"
    for _ in range(50):
        fast.observe_step(1, 8.0)
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "b"


def test_power_is_a_table_by_width_seeded_and_learned_per_width() -> None:
    m = CostModel(1.0, 8.0, 10.0, widths={4: 12.0, 16: 30.0}, watts_widths={4: 20.0},
                  max_rows=16, alpha=0.5)
    assert m.watts_at(1) == 10.0 and m.watts_at(4) == 20.0 and m.watts_at(16) == 20.0
    assert m.watts_at(2) == pytest.approx(10.0 + 10.0 / 3)  # linear between measured widths
    assert m.step_mj(16) == pytest.approx(30.0 * 20.0)
    m.observe_energy(16, joules=3.0, seconds=0.1)  # 30 W measured on a 16-row step
    assert m.watts_at(16) == pytest.approx(25.0)
    assert m.watts_at(1) == 10.0 and m.watts_at(4) == 20.0  # other widths keep theirs
    m.observe_energy(0, joules=4.0, seconds=0.1)  # a prefill: its own power
    assert m.prefill_watts == pytest.approx(25.0) and m.watts == 10.0
    snap = m.copy()
    m.observe_energy(16, 0.0, 0.1)
    assert snap.watts_at(16) == pytest.approx(25.0)  # a copy does not move with the original
    row = np.array([0, 1, 16, 40])
    assert list(m.watts_many(row)) == [0.0, 10.0, m.watts_at(16), m.watts_at(16)]
