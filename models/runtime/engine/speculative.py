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
their buffers are not); rolling back rejected positions is lowering a row's length, no copy. A
round is batched on both sides: the draft steps every drafting row together (one batched step
per drafted position, rows leaving once they have their ``k``), and the target verifies every
row's ``[last, d1..dk]`` in one forward (rows with fewer drafts padded) through its verify graph,
where greenroute's ``BatchedGroupQueryAttention`` replaces onnxruntime's GroupQueryAttention
(which refuses several new positions with a past at batch > 1; :mod:`models.build.pipeline.
verify_graph`). Without that graph (not built, no kernels library, CUDA) each drafting row is
verified in a forward of its own. Given the draft rung's own slots and row pool (the service
does when that rung is loaded: :func:`serving.batch.batches_for`), the draft rows live in its
KV buffer and its ready rows ride the draft steps (:class:`~models.runtime.engine.rows.Riders`):
each draft step is one forward over both, so a draft row costs a wide step's increment.
Each row's ``k`` follows its acceptance (:func:`k_for`). A row whose acceptance (a moving
average) falls below ``min_acceptance`` pauses: it decodes plainly for ``PAUSE_TOKENS`` tokens,
then drafts again, each further pause twice as long (up to ``MAX_PAUSE_TOKENS``; text is easy
to predict in stretches: docs/routing-and-energy.md, The speculative rung).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Ride, Riders, RowPool
from models.runtime.engine.sampling import distribution, sample_from
from models.runtime.engine.slots import KVSlots, Sampler, Slots, StepResult

ACCEPTANCE_DECAY = 0.7  # weight of a row's acceptance estimate kept per round
PAUSE_TOKENS = 8  # plain tokens of a row's first pause; each further pause doubles
MAX_PAUSE_TOKENS = 128


def k_for(acceptance: float, k_max: int) -> int:
    """Tokens a row drafts next round: about the run of agreement its acceptance predicts
    (with per-token acceptance ``a`` the target keeps ``a / (1 − a)`` drafts in a row on
    average; drafting past the expected run mostly buys rejected positions), 1 .. ``k_max``."""
    if acceptance >= 1.0:
        return k_max
    return max(1, min(k_max, int(1.0 / (1.0 - acceptance))))


def rung_threads(target: int, draft: int) -> int:
    """The speculative rung's thread count as a calibration records it: the models' common
    count, or 0 when they differ (a one-core draft beside a two-thread target)."""
    return target if target == draft else 0


class SpecSlots(Slots):
    """Rows decoded speculatively: ``target``'s distribution, ``draft``'s proposals."""

    batched = True  # every row's round shares the draft's steps and the target's forward
    kind = "speculative"

    def __init__(self, target: OrtEngine, draft: OrtEngine, k: int, max_batch: int,
                 max_len: int, min_acceptance: float = 0.0, batched_verify: bool = True,
                 draft_slots: KVSlots | None = None, draft_rows: RowPool | None = None) -> None:
        """``draft_slots`` and ``draft_rows``: the draft rung's own slots and row pool, to keep
        the draft rows in its KV buffer (so its rows can ride the draft steps: ``riders``);
        without them the draft rows get slots of their own."""
        if k < 1:
            raise ValueError("k must be >= 1")
        super().__init__(target, max_batch, max_len)
        self.k = k
        self.min_acceptance = min_acceptance
        if batched_verify:
            target.load_verify()  # once per engine (a no-op after): the verify graph's session
        # room for a round's k drafted positions past a row's last kept token
        self.target = KVSlots(target, max_batch, self.max_len + k + 1,
                              verify_positions=k + 1 if batched_verify else 0)
        self.shares_draft = draft_slots is not None
        if draft_slots is not None:
            if draft_rows is None or draft_slots.ort_engine is not draft:
                raise ValueError("shared draft slots need their row pool and the draft's engine")
            if draft_slots.max_len < min(self.max_len + k + 1, draft.context_length):
                raise ValueError("the shared draft slots have no room for a round's drafts")
        self.draft = draft_slots or KVSlots(draft, max_batch, self.max_len + k + 1)
        self._draft_rows = draft_rows or RowPool(max_batch)
        self._drow: dict[int, int] = {}  # the row's row in the draft's slots
        self._pending: dict[int, list[int]] = {}  # kept tokens the draft has not seen yet
        self._acceptance: dict[int, float] = {}  # moving average of kept / drafted
        self._plain: dict[int, int] = {}  # plain tokens left in the row's pause (0: drafting)
        self._pauses: dict[int, int] = {}  # pauses the row has taken
        self._k: dict[int, int] = {}  # tokens the row drafts a round (adapts to acceptance)
        self._base: dict[int, int] = {}  # the draft's length through the round's ``last``
        self.drafted = 0  # counters since start: drafted tokens, and those the target kept
        self.accepted = 0
        self.rode = 0  # tokens riders took on the draft steps

    @property
    def kv_bytes(self) -> int:
        """Its own rows of both models (the sessions are shared; the KV is not; a shared
        draft buffer is its rung's)."""
        return self.target.kv_bytes + (0 if self.shares_draft else self.draft.kv_bytes)

    @property
    def kv_written_bytes(self) -> int:
        return self.target.kv_written_bytes + (0 if self.shares_draft
                                               else self.draft.kv_written_bytes)

    @property
    def speculation(self) -> tuple[int, int]:
        return self.drafted, self.accepted

    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        if row in self._drow:
            raise ValueError(f"row {row} is in use")
        first = sampler(self.target.forward(row, prompt_ids)[-1])
        d = self._drow[row] = self._draft_rows.take()  # freed by release, even on a failure
        self.draft.forward(d, prompt_ids)
        self._pending[row], self._acceptance[row] = [], 1.0
        self._plain[row] = self._pauses[row] = 0
        self._k[row] = self.k
        return first

    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        raise TypeError("speculative rows may produce several tokens a step: use step_many")

    def step_many(self, rows: Sequence[int], tokens: Sequence[int],
                  samplers: Sequence[Sampler], riders: Riders | None = None) -> StepResult:
        """One round for every row in ``rows`` (newest kept tokens ``tokens``, which neither
        model has seen): the draft steps all drafting rows together, then the target takes
        every row's ``[last, drafts...]`` in one forward (a row pausing takes ``[last]``); without
        the verify graph, rows taking a plain step share one target step and each drafting row
        is verified alone. ``riders`` (rows of the draft's own rung, in the shared draft slots)
        take part in the draft steps, a token each, up to their limits. Returns each row's new
        tokens (and each rider's)."""
        ks = [0 if self._plain[r] > 0 else
              max(0, min(self._k[r], self.target.max_len - int(self.target.lengths[r]) - 1))
              for r in rows]
        drafts, q, catch_up, rode, rider_s = self._draft(rows, tokens, samplers, ks, riders)
        starts = [int(self.target.lengths[r]) for r in rows]
        verify = self.target.forward_rows(
            rows, [[last, *d] for last, d in zip(tokens, drafts, strict=True)])
        out, work = [], []
        for i, (row, last, sampler) in enumerate(zip(rows, tokens, samplers, strict=True)):
            out.append(self._accept(row, last, sampler, drafts[i], q[i], verify[i], starts[i]))
            work.append(ks[i] + 1 + catch_up[i] + ks[i])
        return StepResult(out, work, riders=rode[0], riders_failed=rode[1],
                          rider_seconds=rider_s)

    def _draft(self, rows: Sequence[int], tokens: Sequence[int], samplers: Sequence[Sampler],
               ks: Sequence[int], riders: Riders | None
               ) -> tuple[list[list[int]], list[list[np.ndarray]], list[int],
                          tuple[list[list[int]], dict[int, Exception]], float]:
        """Each drafting row's ``k`` proposals, the draft stepping the rows together (each row
        leaves the steps once it has its ``k``); their distributions where sampling; the
        catch-up tokens each row fed first; the riders' tokens and failures, and their share
        of the draft steps' seconds (each step's time by rows)."""
        drafts: list[list[int]] = [[] for _ in rows]
        q: list[list[np.ndarray]] = [[] for _ in rows]
        catch_up = [0] * len(rows)
        drafting = [i for i, k in enumerate(ks) if k > 0]
        drow = [self._drow[r] for r in rows]
        # catch the draft up on kept tokens it has not seen: one pending token (the last
        # draft of a round that kept them all) in one batched step; more (after a pause)
        # row by row
        single = [i for i in drafting if len(self._pending[rows[i]]) == 1]
        if single:
            self.draft.step_logits([drow[i] for i in single],
                                   [self._pending[rows[i]][0] for i in single])
        for i in drafting:
            pending = self._pending[rows[i]]
            if len(pending) > 1:
                self.draft.forward(drow[i], pending)
            catch_up[i] = len(pending)
            self._pending[rows[i]] = []
        for i in drafting:
            self._base[rows[i]] = int(self.draft.lengths[drow[i]]) + 1  # up to ``last``
        feed = {i: tokens[i] for i in drafting}
        ride, rider_s = Ride(riders, self.draft.engine.eos_token_ids), 0.0
        for j in range(max(ks, default=0)):
            now = [i for i in drafting if ks[i] > j]
            along = ride.rows(j)
            t0 = time.perf_counter()
            logits = self.draft.step_logits([drow[i] for i in now] + along,
                                            [feed[i] for i in now] + ride.feed())
            rider_s += (time.perf_counter() - t0) * len(along) / (len(now) + len(along))
            for x, i in enumerate(now):
                params, rng = samplers[i].params, samplers[i].rng
                if params.greedy:
                    d = int(np.argmax(logits[x]))
                else:
                    q[i].append(distribution(logits[x], params))
                    d = sample_from(q[i][-1], rng)
                drafts[i].append(d)
                feed[i] = d
            self.rode += ride.take(logits[len(now):])
        return drafts, q, catch_up, (ride.tokens, ride.failed), rider_s  # the draft was
        # fed last, d1..d_{k-1}

    def _accept(self, row: int, last: int, sampler: Sampler, drafts: list[int],
                q: list[np.ndarray], verify: np.ndarray, start: int) -> list[int]:
        """Keep the longest prefix of ``drafts`` the target agrees with, plus one token of its
        own; roll both models back to it; update the row's acceptance and ``k``."""
        k = len(drafts)
        params, rng = sampler.params, sampler.rng
        if k == 0:  # a plain step
            self.target.truncate(row, start + 1)
            self._pending[row].append(last)
            if self._plain[row] > 0:
                self._plain[row] -= 1
                if self._plain[row] == 0:  # the pause is over: the next round drafts afresh
                    self._acceptance[row] = 1.0
            return [sampler(verify[0])]
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
        self.target.truncate(row, start + 1 + accepted)
        # the draft holds last, d1..d_{k-1}: keep last, d1..d_accepted; after a full accept
        # it never fed d_k, which waits for the next round
        if accepted < k:
            self.draft.truncate(self._drow[row], self._base[row] + accepted)
        else:
            self._pending[row] = [drafts[-1]]
        self.drafted += k
        self.accepted += accepted
        a = self._acceptance[row] = (ACCEPTANCE_DECAY * self._acceptance[row]
                                     + (1 - ACCEPTANCE_DECAY) * accepted / k)
        self._k[row] = k_for(a, self.k)
        if a < self.min_acceptance:  # drafting costs more than it saves here: pause
            self._plain[row] = min(MAX_PAUSE_TOKENS, PAUSE_TOKENS << self._pauses[row])
            self._pauses[row] += 1
        return [*drafts[:accepted], tail]

    def release(self, row: int) -> None:
        self.target.release(row)
        d = self._drow.pop(row, None)
        if d is not None:
            self.draft.release(d)
            self._draft_rows.give(d)
        self._pending.pop(row, None)
        self._acceptance.pop(row, None)
        self._plain.pop(row, None)
        self._pauses.pop(row, None)
        self._k.pop(row, None)
        self._base.pop(row, None)


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
        self.batched_verify = target.load_verify()  # its graph and session, made here once
        self.threads = rung_threads(target.threads, draft.threads)
        self.min_acceptance = min_acceptance
        self.drafted = self.accepted = 0

    @property
    def device(self) -> str:
        """Where its sessions run: its target's (the draft's are on the same device)."""
        return self.target.device

    def own_slots(self, max_batch: int, max_len: int, draft_slots: KVSlots | None = None,
                  draft_rows: RowPool | None = None) -> SpecSlots:
        return SpecSlots(self.target, self.draft, self.k, max_batch, max_len,
                         self.min_acceptance, draft_slots=draft_slots, draft_rows=draft_rows)

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
                batch = slots.step_many([0], [token], [sampler]).tokens[0]
                for extra in batch[:-1]:
                    yield extra
                    produced += 1
                    if produced >= params.max_new_tokens:
                        return
                token = batch[-1]
        finally:
            self.drafted += slots.drafted
            self.accepted += slots.accepted
