"""What the lane tells a request's consumer, in order: :class:`Chunks` as tokens are produced,
then exactly one of :class:`Finished` (it ran to an end), :class:`Skipped` (cancelled or timed
out while waiting: it never ran) or :class:`Failed` (the runtime or the lane failed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models.runtime.engine.base import Chunk, FinishReason
from telemetry.base import EnergyReading


@dataclass(frozen=True)
class Chunks:
    """Text chunks produced since the last delivery (a stream's come every few ms)."""

    chunks: list[Chunk]


@dataclass(frozen=True)
class Finished:
    """The end of a request that ran: its cost and timing (``perf_counter`` seconds)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # generated tokens other than EOS
    steps: int  # generated tokens, EOS included: the denominator of time per token
    energy: EnergyReading  # its ledger share: joules over its seconds in the lane
    admitted: float  # when it got a row (its prefill started)
    first_token: float  # 0.0 when none
    last_token: float


@dataclass(frozen=True)
class Skipped:
    """Cancelled or past its timeout before it got a row: nothing ran, nothing is charged."""


@dataclass(frozen=True)
class Failed:
    """The runtime failed on its row, or the lane died (:class:`serving.errors.LaneFailedError`);
    the chunks it produced came before."""

    error: Exception


Event = Chunks | Finished | Skipped | Failed
Emit = Callable[[Event], None]
