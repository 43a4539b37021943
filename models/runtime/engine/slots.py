"""The per-sequence step API: a variant's continuous batch as a set of slots (rows).

A sequence is prefilled into a free row (``prefill``), then every ``step`` decodes one token for
each row it names; a row is freed with ``release`` the moment its sequence ends. Sampling stays
with the sequence (its :class:`Sampler` holds its parameters and random generator), so a row's
tokens do not depend on which other rows share its steps.

* :class:`KVSlots` batches for real, on onnxruntime-genai builder graphs
  (``GroupQueryAttention`` with ``past_present_share_buffer``): one KV buffer per layer,
  ``[max_batch, kv_heads, max_len, head_dim]``, is bound as both past and present, and the graph
  writes each step's K/V in place at each row's own length, which it reads from the attention
  mask (ones for the tokens a row holds). Rows at different lengths share a step; a row's
  length *is* its state, so rolling back (speculative decoding) is lowering it: no copy.
* :class:`SerialSlots` serves every other engine (optimum's concat graphs, onnxruntime-genai's
  ``Generator``): each row keeps its engine's own token iterator and a step advances them one
  after another — interleaved, not batched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from models.runtime.engine.base import Engine
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import BadLogitsError, Sampler, Slots, StepResult

__all__ = ["BadLogitsError", "KVSlots", "Sampler", "SerialSlots", "Slots", "StepResult",
           "slots_for"]


class SerialSlots(Slots):
    """Rows that each keep their engine's own token iterator; a step advances them in turn."""

    batched = False
    kind = "serial"

    def __init__(self, engine: Engine, max_batch: int, max_len: int) -> None:
        super().__init__(engine, max_batch, min(max_len, engine.context_length))
        self._iters: dict[int, Iterator[int]] = {}

    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        if row in self._iters:
            raise ValueError(f"row {row} is in use")
        # the engine samples with a generator seeded the same way as the sequence's own
        it = self.engine._token_ids(prompt_ids, sampler.params)
        self._iters[row] = it
        return next(it)

    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        return [next(self._iters[row]) for row in rows]

    def release(self, row: int) -> None:
        it = self._iters.pop(row, None)
        close = getattr(it, "close", None)
        if close is not None:
            close()


def slots_for(engine: Engine, max_batch: int, max_len: int) -> Slots:
    """Real batching where the graph allows it, speculative rows for the speculative rung,
    interleaving otherwise."""
    own = engine.own_slots(max_batch, max_len)
    if own is not None:
        return own
    if isinstance(engine, OrtEngine) and engine.shared_kv:
        return KVSlots(engine, max_batch, max_len)
    return SerialSlots(engine, max_batch, max_len)
