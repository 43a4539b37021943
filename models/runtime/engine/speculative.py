"""Speculative decoding: ``full``'s exact output, drafted by a cheaper rung, verified in one pass.

Per round and row (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1): the draft proposes ``k`` tokens one by one; the target runs once over
``[last, d1..dk]`` (``k + 1`` positions) and the longest prefix it agrees with is kept, plus one
token of its own: the correction at the first disagreement, or a bonus token when all ``k``
agreed. Greedy: agreement is the target's argmax. Sampling: ``d_i`` is kept with probability
``min(1, p(d_i) / q(d_i))``, a rejection is replaced by a draw from ``norm(max(0, p − q))``, so
the output is distributed exactly as the target's (``p``, ``q``: the target's and the draft's
distributions after the request's temperature, top-k and top-p).

Both models keep their rows in their own :class:`KVSlots` (the variants' sessions are shared,
their buffers are not); rolling back rejected positions is lowering a row's length, no copy.
Rows speculate one at a time inside a step (batch 1 per forward): the verify pass is a
multi-token forward of one row. A row whose acceptance (a moving average over its rounds) falls
below ``min_acceptance``, where rounds stop paying for themselves, pauses: it decodes plainly
for ``PAUSE_TOKENS`` tokens, then drafts again, and each further pause of that row is twice as
long (up to ``MAX_PAUSE_TOKENS``). Text is easy to predict in stretches: a row that stopped for
good after two bad rounds lost the rest of its request's speed-up (measured on the route
workload's nine full-floor requests: 1.15x full, against 1.53x with pauses and 1.57x for rows
that never stop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.sampling import distribution, sample_from
from models.runtime.engine.slots import KVSlots, Sampler, Slots

ACCEPTANCE_DECAY = 0.7  # weight of a row's acceptance estimate kept per round
PAUSE_TOKENS = 8  # plain tokens of a row's first pause; each further pause doubles
MAX_PAUSE_TOKENS = 128


def rung_threads(target: int, draft: int) -> int:
    """The speculative rung's thread count as a calibration records it: the models' common
    count, or 0 when they differ (a one-core draft beside a two-thread target)."""
    return target if target == draft else 0


class SpecSlots(Slots):
    """Rows decoded speculatively: ``target``'s distribution, ``draft``'s proposals."""

    batched = False  # rows run their rounds one after another
    kind = "speculative"

    def __init__(self, target: OrtEngine, draft: OrtEngine, k: int, max_batch: int,
                 max_len: int, min_acceptance: float = 0.0) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        super().__init__(target, max_batch, max_len)
        self.k = k
        self.min_acceptance = min_acceptance
        # room for a round's k drafted positions past a row's last kept token
        self.target = KVSlots(target, max_batch, self.max_len + k + 1)
        self.draft = KVSlots(draft, max_batch, self.max_len + k + 1)
        self._pending: dict[int, list[int]] = {}  # kept tokens the draft has not seen yet
        self._acceptance: dict[int, float] = {}  # moving average of kept / drafted
        self._plain: dict[int, int] = {}  # plain tokens left in the row's pause (0: drafting)
        self._pauses: dict[int, int] = {}  # pauses the row has taken
        self.drafted = 0  # counters since start: drafted tokens, and those the target kept
        self.accepted = 0

    @property
    def kv_bytes(self) -> int:
        """Its own rows of both models (the sessions are shared; the KV is not)."""
        return self.target.kv_bytes + self.draft.kv_bytes

    @property
    def kv_written_bytes(self) -> int:
        return self.target.kv_written_bytes + self.draft.kv_written_bytes

    @property
    def speculation(self) -> tuple[int, int]:
        return self.drafted, self.accepted

    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        first = sampler(self.target.forward(row, prompt_ids)[-1])
        self.draft.forward(row, prompt_ids)
        self._pending[row], self._acceptance[row] = [], 1.0
        self._plain[row] = self._pauses[row] = 0
        return first

    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        raise TypeError("speculative rows may produce several tokens a step: use step_many")

    def step_many(self, rows: Sequence[int], tokens: Sequence[int],
                  samplers: Sequence[Sampler]) -> list[list[int]]:
        out, self.work = [], []
        for row, last, sampler in zip(rows, tokens, samplers, strict=True):
            produced, work = self._round(row, last, sampler)
            out.append(produced)
            self.work.append(work)
        return out

    def _round(self, row: int, last: int, sampler: Sampler) -> tuple[list[int], int]:
        """One round for ``row`` whose newest kept token ``last`` neither model has seen;
        returns (new tokens, tokens pushed through the two models)."""
        room = self.target.max_len - int(self.target.lengths[row]) - 1
        k = min(self.k, room)
        if self._plain[row] > 0 or k < 1:  # paused, or no room: a plain step of the target
            if self._plain[row] > 0:
                self._plain[row] -= 1
                if self._plain[row] == 0:  # the pause is over: the next round drafts afresh
                    self._acceptance[row] = 1.0
            self._pending[row].append(last)
            return [sampler(self.target.advance(row, last))], 1
        params, rng = sampler.params, sampler.rng
        # 1. draft k tokens (after catching the draft up on what it has not seen)
        feed = [*self._pending[row], last]
        self._pending[row] = []
        if len(feed) == 1:
            logits = self.draft.advance(row, last)
        else:
            logits = self.draft.forward(row, feed)[-1]
        base = int(self.draft.lengths[row])  # the draft holds everything up to ``last``
        drafts: list[int] = []
        q: list[np.ndarray] = []
        for i in range(k):
            if params.greedy:
                drafts.append(int(np.argmax(logits)))
            else:
                q.append(distribution(logits, params))
                drafts.append(sample_from(q[-1], rng))
            if i < k - 1:
                logits = self.draft.advance(row, drafts[-1])
        # 2. verify: the target over [last, d1..dk] in one pass
        start = int(self.target.lengths[row])
        verify = self.target.forward(row, [last, *drafts])
        accepted, tail = 0, None
        for i, d in enumerate(drafts):
            if params.greedy:
                choice = int(np.argmax(verify[i]))
                if choice == d:
                    accepted += 1
                    continue
                tail = choice
                break
            p = distribution(verify[i], params)
            if rng.random() * q[i][d] < p[d]:  # accept with probability min(1, p/q)
                accepted += 1
                continue
            residual = np.maximum(p - q[i], 0.0)
            total = residual.sum()
            tail = sample_from(residual / total if total > 0 else p, rng)
            break
        if tail is None:  # every draft kept: a bonus token from the last position
            tail = sampler(verify[k]) if params.greedy else sample_from(
                distribution(verify[k], params), rng)
        kept = [*drafts[:accepted], tail]
        # 3. roll both rows back to [.., last, d1..d_accepted]
        self.target.truncate(row, start + 1 + accepted)
        if accepted < k:
            self.draft.truncate(row, base + accepted)
        else:  # it never fed d_k: catch up next round
            self._pending[row] = [drafts[-1]]
        self.drafted += k
        self.accepted += accepted
        a = self._acceptance[row] = (ACCEPTANCE_DECAY * self._acceptance[row]
                                     + (1 - ACCEPTANCE_DECAY) * accepted / k)
        if a < self.min_acceptance:  # drafting costs more than it saves here: pause
            self._plain[row] = min(MAX_PAUSE_TOKENS, PAUSE_TOKENS << self._pauses[row])
            self._pauses[row] += 1
        return kept, (k + 1) + len(feed) + (k - 1)

    def release(self, row: int) -> None:
        self.target.release(row)
        self.draft.release(row)
        self._pending.pop(row, None)
        self._acceptance.pop(row, None)
        self._plain.pop(row, None)
        self._pauses.pop(row, None)


class SpeculativeEngine(Engine):
    """The speculative rung behind the ordinary engine interface (one sequence at a time, for
    calibration, benchmarks and quality checks); the executor batches it through
    :class:`SpecSlots`."""

    runtime = "onnxruntime-speculative"

    def __init__(self, target: OrtEngine, draft: OrtEngine, k: int,
                 min_acceptance: float = 0.0) -> None:
        if not (target.shared_kv and draft.shared_kv):
            raise ValueError("speculative decoding needs shared-KV (GroupQueryAttention) "
                             "graphs for both the target and the draft")
        super().__init__(target.tokenizer, target.context_length, sorted(target.eos_token_ids))
        self.target, self.draft, self.k = target, draft, k
        self.threads = rung_threads(target.threads, draft.threads)
        self.min_acceptance = min_acceptance
        self.drafted = self.accepted = 0

    def own_slots(self, max_batch: int, max_len: int) -> SpecSlots:
        return SpecSlots(self.target, self.draft, self.k, max_batch, max_len,
                         self.min_acceptance)

    def _token_ids(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        slots = self.own_slots(1, len(prompt_ids) + params.max_new_tokens)
        sampler = Sampler(params)
        token = slots.prefill(0, prompt_ids, sampler)
        produced = 0
        try:
            while True:
                yield token
                produced += 1
                if produced >= params.max_new_tokens:
                    return
                batch = slots.step_many([0], [token], [sampler])[0]
                for extra in batch[:-1]:
                    yield extra
                    produced += 1
                    if produced >= params.max_new_tokens:
                        return
                token = batch[-1]
        finally:
            self.drafted += slots.drafted
            self.accepted += slots.accepted
