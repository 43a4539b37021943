"""The row API every batch implements (:class:`Slots`) and a sequence's sampler; see
:mod:`models.runtime.engine.slots` for the implementations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.runtime.engine.base import (
    Engine,
    GenerationParams,
)
from models.runtime.engine.sampling import make_rng, select_token


class Sampler:
    """A sequence's next-token choice: its decoding parameters and private random generator."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.rng = make_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        token = select_token(logits, self.params, self.rng)
        # a NaN anywhere wins argmax and poisons every sampled distribution: checked on the
        # chosen logit (greedy) and the maximum (sampled), not over the whole vocabulary
        if not np.isfinite(logits[token]) or (
                not self.params.greedy and not np.isfinite(logits.max())):
            raise BadLogitsError(f"non-finite logits (token {token}: {logits[token]})")
        return token


class BadLogitsError(ValueError):
    """A row's logits hold NaN or infinity: that row cannot continue (the others can)."""


@dataclass(frozen=True)
class StepResult:
    """What one step gave its rows (in the order they were named)."""

    tokens: list[list[int]]  # each row's new tokens (several from a speculative round)
    work: list[int]  # tokens each row pushed through the device (its energy share)
    failed: dict[int, Exception] = field(default_factory=dict)  # row → why its sampling
    # failed (bad logits): that row alone fails; its entry in ``tokens`` is a placeholder
    riders: list[list[int]] = field(default_factory=list)  # each rider's tokens (Riders)
    riders_failed: dict[int, Exception] = field(default_factory=dict)  # rider row → why
    rider_seconds: float = 0.0  # the riders' share of the draft steps' time (by rows)


@dataclass(frozen=True)
class Riders:
    """Another batch's rows that ride along a step of the slots they share a KV buffer with
    (a speculative rung's draft steps carry its draft rung's own rows): each row's newest
    token, sampler, and the most tokens it may take (its budget left, its row's room)."""

    rows: list[int]
    tokens: list[int]
    samplers: list[Sampler]
    limits: list[int]


class Ride:
    """Riders over one round of a speculative rung's draft steps: who rides step ``j``, what
    each is fed, what each took. A rider leaves at its limit, at an end-of-sequence token, or
    when its logits fail."""

    def __init__(self, riders: Riders | None, eos: frozenset[int]) -> None:
        self.r = riders or Riders([], [], [], [])
        self.eos = eos
        self.tokens: list[list[int]] = [[] for _ in self.r.rows]
        self.failed: dict[int, Exception] = {}
        self._on: list[int] = []  # the current step's riders (indexes)
        self._done = [False] * len(self.r.rows)

    def rows(self, j: int) -> list[int]:
        self._on = [x for x, limit in enumerate(self.r.limits) if limit > j and not self._done[x]]
        return [self.r.rows[x] for x in self._on]

    def feed(self) -> list[int]:
        return [(self.tokens[x] or [self.r.tokens[x]])[-1] for x in self._on]

    def take(self, logits: np.ndarray) -> int:
        """Sample each of the step's riders from its logits; the tokens taken."""
        for y, x in enumerate(self._on):
            sampler = self.r.samplers[x]
            try:
                token = sampler(logits[y])
            except Exception as err:  # noqa: BLE001 (its own fault: it alone fails)
                self.failed[self.r.rows[x]] = err
                self._done[x] = True
                continue
            self.tokens[x].append(token)
            self._done[x] = token in self.eos and not sampler.params.ignore_eos
        return sum(1 for x in self._on if self.r.rows[x] not in self.failed)


class RowPool:
    """The free rows of one KV buffer, lowest first (a batched step runs over the prefix of
    rows up to the highest in use, so low rows keep it short). Two batches that share a
    buffer (a rung's own rows and a speculative rung's draft rows) take rows from one pool."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() gives the lowest

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free row in the pool")
        self._free.sort(reverse=True)
        return self._free.pop()

    def give(self, row: int) -> None:
        if not 0 <= row < self.size or row in self._free:
            raise ValueError(f"row {row} is not a taken row of this pool")
        self._free.append(row)


class Slots(ABC):
    """``max_batch`` rows of at most ``max_len`` tokens each (prompt + generated)."""

    batched: bool  # whether one step runs its rows in one forward pass
    kind: str  # for /v1/variants and logs
    chunked = False  # whether a prompt can be prefilled in parts (prefill_part)

    def __init__(self, engine: Engine, max_batch: int, max_len: int) -> None:
        if max_batch < 1 or max_len < 2:
            raise ValueError("max_batch must be >= 1 and max_len >= 2")
        self.engine = engine
        self.max_batch = max_batch
        self.max_len = max_len

    @property
    def kv_bytes(self) -> int:
        """Memory its KV cache takes with every row full (0 where the engine keeps its own)."""
        return 0

    @property
    def kv_written_bytes(self) -> int:
        """KV memory rows have written since start: with lazily-backed buffers, about what is
        resident (0 where the engine keeps its own)."""
        return 0

    @property
    def speculation(self) -> tuple[int, int] | None:
        """Tokens drafted and tokens the target kept, since start (None: rows that do not
        speculate)."""
        return None

    @abstractmethod
    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        """Process a new sequence's prompt in ``row``; return its first generated token."""

    def prefill_part(self, row: int, token_ids: Sequence[int], sampler: Sampler,
                     final: bool) -> int | None:
        """Append the next part of a prompt to ``row``; on the ``final`` part return the first
        generated token. Slots that are not :attr:`chunked` take the whole prompt as one final
        part."""
        if not final:
            raise NotImplementedError(f"{type(self).__name__} prefills a prompt in one piece")
        return self.prefill(row, token_ids, sampler)

    @abstractmethod
    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        """Feed each row its last token; return each row's next token (same order)."""

    def step_many(self, rows: Sequence[int], tokens: Sequence[int],
                  samplers: Sequence[Sampler]) -> StepResult:
        """Like :meth:`step`, for the lane: a row may get several tokens (speculative
        decoding), each row's work is counted, and a row whose sampling failed is reported
        instead of failing the step."""
        return StepResult([[t] for t in self.step(rows, tokens, samplers)], [1] * len(rows))

    @abstractmethod
    def release(self, row: int) -> None:
        """Forget the row's sequence; the row is free at once."""


