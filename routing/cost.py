"""Per-variant cost model: the time of one decode step at each batch width, of a prefill, and
of following another variant's step on the device; the watts the device draws meanwhile.

A variant decodes in steps over its continuous batch. ``step_ms(rows)`` is a *table* indexed by
the step's width (the rows the forward covers), not a straight line: on int8's
``MatMulNBits`` graphs the second row switches from a matrix-vector kernel to a
matrix-matrix one and costs far more than the third. The table is seeded from a calibration
at a few widths (linear between them, the last segment's slope beyond) and every observed step
moves its own width's entry (exponentially weighted), kept non-decreasing in width.

``switch_ms``: what a step costs on top of the table when the previous step on the device was
another variant's (its weights are out of cache, the other session's pool threads still spin).
It is learnt only from such steps, and the table only from steps that followed the same
variant, so interleaving under load never inflates the per-token time: the cost of switching
is priced separately, on the decision that causes it (see :mod:`routing.timeline`).

A prefill of ``n`` prompt tokens takes ``step_ms(1) + prefill_ms_per_token × n``.

Power is priced per width too: ``watts_at(rows)`` is a second table, the device's average power
while a step of that width runs. One number per variant is wrong wherever a variant's wide
steps run on another session than its narrow ones (the quantized rungs step on a one-thread
session below a few rows and a two-thread one above: the wide steps draw about twice the
power), and a router believing the narrow figure sends load to the rung whose wide steps cost
the most. The table is seeded from measured energy at a few widths (start-up), and each step's
measured energy is attributed to that step (``observe_energy``), moving its width's entry;
prefills have their own power (``prefill_watts``). No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CostModel:
    """Coefficients for one variant (units in the names)."""

    prefill_ms_per_token: float
    decode_ms_per_token: float  # one step of a batch of one (the table's first entry)
    watts: float
    step_ms_per_row: float = -1.0  # seed slope between measured widths; < 0: a quarter
    overhead_ms: float = 0.0
    switch_ms: float = 0.0  # extra time of a step that follows another variant's
    alpha: float = 0.2  # weight of each new observation
    observations: int = 0  # steps and prefills folded in
    widths: Mapping[int, float] | None = None  # measured step ms by width (a calibration)
    max_rows: int = 64  # widths the table holds (wider: extrapolated)
    watts_widths: Mapping[int, float] | None = None  # measured power by width (a calibration)
    prefill_watts: float = -1.0  # < 0: the one-row step's
    _table: np.ndarray = field(init=False, repr=False)
    _watts: np.ndarray = field(init=False, repr=False)
    _min_cum: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.step_ms_per_row < 0:
            self.step_ms_per_row = 0.25 * self.decode_ms_per_token
        anchors = {1: self.decode_ms_per_token, **dict(self.widths or {})}
        xs = sorted(w for w in anchors if 1 <= w <= self.max_rows)
        ys = [anchors[w] for w in xs]
        grid = np.arange(1, self.max_rows + 1, dtype=np.float64)
        table = np.interp(grid, xs, ys)
        last_slope = ((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1
                      else self.step_ms_per_row)
        beyond = grid > xs[-1]
        table[beyond] = ys[-1] + max(0.0, last_slope) * (grid[beyond] - xs[-1])
        # index 0: no rows, no step
        self._table = np.maximum.accumulate(np.concatenate(([0.0], table)))
        self.decode_ms_per_token = float(self._table[1])
        # the least a row past another adds, kept while learning: half the seeded increment
        # (cumulated by width, so a bound over a stretch of widths is one subtraction)
        self._min_cum = np.cumsum(np.concatenate(([0.0, 0.0], 0.5 * np.diff(self._table[1:]))))
        # power by width: linear between measured widths, flat beyond them
        power = {1: self.watts, **dict(self.watts_widths or {})}
        px = sorted(w for w in power if 1 <= w <= self.max_rows)
        self._watts = np.concatenate(([0.0], np.interp(grid, px, [power[w] for w in px])))
        self.watts = float(self._watts[1])
        if self.prefill_watts < 0:
            self.prefill_watts = self.watts

    # -- predictions ------------------------------------------------------------------------
    def _slope(self) -> float:
        t = self._table
        return max(0.0, float(t[-1] - t[-2])) if len(t) > 2 else self.step_ms_per_row

    def step_ms(self, rows: int) -> float:
        """One decode step over ``rows`` sequences (0 rows: no step)."""
        if rows <= 0:
            return 0.0
        last = len(self._table) - 1
        if rows <= last:
            return float(self._table[rows])
        return float(self._table[last]) + self._slope() * (rows - last)

    def steps_ms(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`step_ms` of every entry of an integer array (0 rows: 0 ms)."""
        last = len(self._table) - 1
        inside = self._table[np.minimum(rows, last)]
        return np.where(rows <= last, inside,
                        self._table[last] + self._slope() * (rows - last))

    def watts_at(self, rows: int) -> float:
        """The device's power while a step of ``rows`` rows runs (wider than the table: its
        widest entry)."""
        return float(self._watts[min(max(rows, 1), len(self._watts) - 1)])

    def watts_many(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`watts_at` of every entry of an integer array (0 rows: 0 W)."""
        last = len(self._watts) - 1
        return np.where(rows > 0, self._watts[np.clip(rows, 1, last)], 0.0)

    def step_mj(self, rows: int) -> float:
        """The energy of one step of ``rows`` rows (millijoules)."""
        return self.step_ms(rows) * self.watts_at(rows)

    def prefill_ms(self, prompt_tokens: int) -> float:
        return self.decode_ms_per_token + self.prefill_ms_per_token * prompt_tokens

    def table(self, rows: int | None = None) -> list[float]:
        """Step ms at widths 1 .. ``rows`` (default: the whole table)."""
        n = rows or len(self._table) - 1
        return [round(self.step_ms(w), 4) for w in range(1, n + 1)]

    # -- learning ---------------------------------------------------------------------------
    def observe_step(self, width: int, ms: float) -> None:
        """A decode step whose forward covered ``width`` rows took ``ms``, right after a step
        of this same variant (or on an otherwise idle device)."""
        if width < 1 or ms <= 0:
            return
        t = self._table
        if width >= len(t):  # grow to it (rare: wider than max_rows)
            last = self._min_cum[-1] - self._min_cum[-2]
            t = self._table = np.concatenate(
                (t, [self.step_ms(w) for w in range(len(t), width + 1)]))
            grown = np.arange(1, len(t) - len(self._min_cum) + 1)
            self._min_cum = np.concatenate((self._min_cum, self._min_cum[-1] + last * grown))
        t[width] += self.alpha * (ms - t[width])
        # keep it non-decreasing in width (a wider step never costs less) without flattening
        # it: every row past another adds at least half the seeded table's increment there
        # (a flat stretch, as a dear narrow step once made by lifting the wider entries to
        # its level, priced a row joining that batch at nothing)
        c = self._min_cum
        np.maximum(t[width:], t[width] + c[width:] - c[width], out=t[width:])
        t[1:width] = np.clip(t[1:width], 0.0, t[width] - (c[width] - c[1:width]))
        self.decode_ms_per_token = float(t[1])
        self.observations += 1

    def observe_switch(self, width: int, ms: float) -> None:
        """A step of ``width`` rows that followed another variant's step took ``ms``: what it
        took beyond the table is the switch's cost (the table itself is left alone)."""
        if width < 1 or ms <= 0:
            return
        extra = ms - self.step_ms(width)
        self.switch_ms = max(0.0, self.switch_ms + self.alpha * (extra - self.switch_ms))

    def observe_prefill(self, prompt_tokens: int, ms: float) -> None:
        """A prefill of ``prompt_tokens`` took ``ms``."""
        if prompt_tokens < 1 or ms <= 0:
            return
        per_token = max(0.0, ms - self.decode_ms_per_token) / prompt_tokens
        self.prefill_ms_per_token += self.alpha * (per_token - self.prefill_ms_per_token)
        self.observations += 1

    def observe_energy(self, width: int, joules: float, seconds: float) -> None:
        """A step of ``width`` rows (0: a prefill) took ``seconds`` and the device spent
        ``joules`` on it: its power moves that width's entry."""
        if seconds <= 0 or joules < 0:
            return
        w = joules / seconds
        if width < 1:
            self.prefill_watts += self.alpha * (w - self.prefill_watts)
            return
        t = self._watts
        if width >= len(t):  # grow to it, as the step table does
            t = self._watts = np.concatenate((t, np.full(width + 1 - len(t), t[-1])))
        t[width] += self.alpha * (w - t[width])
        self.watts = float(t[1])

    def copy(self) -> CostModel:
        """An independent snapshot (the router decides on copies, outside its lock)."""
        out = CostModel(self.prefill_ms_per_token, self.decode_ms_per_token, self.watts,
                        self.step_ms_per_row, self.overhead_ms, self.switch_ms, self.alpha,
                        self.observations, None, self.max_rows, None, self.prefill_watts)
        out._table = self._table.copy()
        out._watts = self._watts.copy()
        out._min_cum = self._min_cum.copy()
        return out

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"prefill_ms_per_token": self.prefill_ms_per_token,
                "decode_ms_per_token": self.decode_ms_per_token,
                "step_ms_per_row": self._slope(), "switch_ms": self.switch_ms,
                "step_ms_by_rows": self.table(16), "watts": self.watts,
                "watts_by_rows": [round(self.watts_at(w), 3) for w in range(1, 17)],
                "step_mj_by_rows": [round(self.step_mj(w), 3) for w in range(1, 17)],
                "prefill_watts": self.prefill_watts,
                "overhead_ms": self.overhead_ms, "observations": self.observations}
