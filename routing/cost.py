"""Per-variant cost model: latency and energy as functions of tokens and of the batch joined.

A variant decodes in steps over its continuous batch. One step over ``rows`` sequences takes
``step_ms(rows) = decode_ms_per_token + step_ms_per_row × (rows − 1)`` (a batch of one costs
``decode_ms_per_token``; each extra row adds far less: the weights are read once per step).
A prefill of ``n`` prompt tokens takes ``decode_ms_per_token + prefill_ms_per_token × n``.
The device draws ``watts`` while the variant runs.

From these, for a request of ``prompt`` tokens and ``new`` tokens joining a batch that already
holds ``occupancy`` rows (``others_ms``: the other variants' steps the lane interleaves):

* latency: ``overhead + prefill(prompt) + new × (step_ms(occupancy + 1) + others_ms)``
* attributed joules (what the ledger will charge it: its share of each step, by tokens):
  ``(prefill(prompt) + new × step_ms(occupancy + 1) / (occupancy + 1)) × watts``
* marginal joules (what serving it adds to the device's bill, what routing minimises):
  ``(prefill(prompt) + new × (step_ms(occupancy + 1) − step_ms(occupancy))) × watts``, where an
  empty batch's ``step_ms(0)`` is 0: the first row pays for whole steps.

Seeded from a calibration, then moved toward what this host does by every observation
(exponentially weighted): a step of one row corrects the level; a step of several rows shares
its error between level and slope in proportion to their parts of the prediction (a host twice
as slow scales both); every prefill and every energy interval moves its own coefficient. No I/O,
no clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    """Coefficients for one variant (units in the names)."""

    prefill_ms_per_token: float
    decode_ms_per_token: float  # one step of a batch of one
    watts: float
    step_ms_per_row: float = -1.0  # each extra row of a step; < 0: a quarter of a batch of one
    overhead_ms: float = 0.0
    alpha: float = 0.2  # weight of each new prefill or energy observation
    observations: int = 0  # steps and prefills folded in

    def __post_init__(self) -> None:
        if self.step_ms_per_row < 0:
            self.step_ms_per_row = 0.25 * self.decode_ms_per_token

    # -- predictions ------------------------------------------------------------------------
    def step_ms(self, rows: int) -> float:
        """One decode step over ``rows`` sequences (0 rows: no step)."""
        if rows <= 0:
            return 0.0
        return self.decode_ms_per_token + self.step_ms_per_row * (rows - 1)

    def prefill_ms(self, prompt_tokens: int) -> float:
        return self.decode_ms_per_token + self.prefill_ms_per_token * prompt_tokens

    def predict_run_ms(self, prompt_tokens: int, new_tokens: int, occupancy: int = 0,
                       others_ms: float = 0.0) -> float:
        """Prefill to last token, joining a batch of ``occupancy`` rows, interleaved with other
        variants' steps of ``others_ms`` in total."""
        per_token = self.step_ms(occupancy + 1) + others_ms
        return self.overhead_ms + self.prefill_ms(prompt_tokens) + per_token * max(
            0, new_tokens - 1)

    def predict_joules(self, prompt_tokens: int, new_tokens: int, occupancy: int = 0) -> float:
        """The request's attributed share (what ``max_joules`` caps)."""
        rows = occupancy + 1
        ms = self.prefill_ms(prompt_tokens) + max(0, new_tokens - 1) * self.step_ms(rows) / rows
        return ms / 1000.0 * self.watts

    def marginal_joules(self, prompt_tokens: int, new_tokens: int, occupancy: int = 0) -> float:
        """What serving the request adds to the device's energy (what routing minimises)."""
        extra = self.step_ms(occupancy + 1) - self.step_ms(occupancy)
        ms = self.prefill_ms(prompt_tokens) + max(0, new_tokens - 1) * extra
        return ms / 1000.0 * self.watts

    # -- learning ---------------------------------------------------------------------------
    def observe_step(self, rows: int, ms: float) -> None:
        """One decode step over ``rows`` sequences took ``ms``."""
        if rows < 1 or ms <= 0:
            return
        predicted = self.step_ms(rows)
        error = self.alpha * (ms - predicted)
        if rows == 1:  # a batch of one measures the level alone
            self.decode_ms_per_token = max(1e-6, self.decode_ms_per_token + error)
        else:  # shared by level and slope in proportion to their parts of the prediction
            level = self.decode_ms_per_token / predicted
            self.decode_ms_per_token = max(1e-6, self.decode_ms_per_token + error * level)
            self.step_ms_per_row = max(0.0, self.step_ms_per_row
                                       + error * (1 - level) / (rows - 1))
        self.observations += 1

    def observe_prefill(self, prompt_tokens: int, ms: float) -> None:
        """A prefill of ``prompt_tokens`` took ``ms``."""
        if prompt_tokens < 1 or ms <= 0:
            return
        per_token = max(0.0, ms - self.decode_ms_per_token) / prompt_tokens
        self.prefill_ms_per_token += self.alpha * (per_token - self.prefill_ms_per_token)
        self.observations += 1

    def observe_power(self, joules: float, seconds: float) -> None:
        """The device drew ``joules`` over ``seconds`` while only this variant ran."""
        if seconds > 0 and joules >= 0:
            self.watts += self.alpha * (joules / seconds - self.watts)

    def as_dict(self) -> dict[str, float | int]:
        return {"prefill_ms_per_token": self.prefill_ms_per_token,
                "decode_ms_per_token": self.decode_ms_per_token,
                "step_ms_per_row": self.step_ms_per_row, "watts": self.watts,
                "overhead_ms": self.overhead_ms, "observations": self.observations}
