"""The draft rung's own rows riding the speculative rung's draft steps: one KV buffer, one row
pool, and every row still gets its own model's tokens (the tiny ladder's real graphs)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from models.runtime.engine.base import GenerationParams
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Riders, RowPool
from models.runtime.engine.slots import Sampler
from models.runtime.engine.speculative import SpecSlots
from models.runtime.ladder import load_ladder
from tests.models.test_slots import alone, assert_same_but_near_ties

PROMPTS = ["def main():", "import json\n\n", "The json module can", "x",
           "Return a new list of the items in the order they were", "class A:", "y = [1,"]


@pytest.fixture(scope="module")
def engines(tiny_ladder: Path) -> dict[str, OrtEngine]:
    ladder = load_ladder(tiny_ladder, threads=1, runtime="onnxruntime", warmup=False,
                         only=["full", "int8"])
    return {n: e for n, e in ladder.engines.items() if isinstance(e, OrtEngine)}


def test_a_row_pool_gives_the_lowest_free_row_and_refuses_a_row_it_did_not_give() -> None:
    pool = RowPool(3)
    assert [pool.take(), pool.take()] == [0, 1]
    pool.give(0)
    assert pool.take() == 0 and len(pool) == 1
    with pytest.raises(ValueError):
        pool.give(2)  # free already
    with pytest.raises(ValueError):
        pool.give(3)  # not one of its rows
    pool.take()
    with pytest.raises(RuntimeError):
        pool.take()


@pytest.mark.parametrize("seed", [0, 1])
def test_riders_and_speculative_rows_share_a_buffer_and_keep_their_own_tokens(
        engines: dict[str, OrtEngine], seed: int) -> None:
    """``int8``'s rows and the speculative rung's draft rows in one buffer and pool: rows of
    both join and leave at random rounds; ``int8``'s rows take tokens on the rung's draft steps
    (riders, never past their limit) and on steps of their own between rounds. Each
    speculative row gets ``full``'s greedy tokens; each ``int8`` row samples (the tiny model's
    greedy text repeats one token, which would hide a rider fed the wrong token) from the
    logits ``int8`` alone gives its own text (a batched and a one-row forward differ by float
    rounding, which can flip a sampled token: the logits are compared, not the tokens)."""
    full, int8 = engines["full"], engines["int8"]
    k, rng = 3, random.Random(seed)
    shared = KVSlots(int8, max_batch=8, max_len=96 + k + 1)
    pool = RowPool(8)
    spec = SpecSlots(full, int8, k, max_batch=4, max_len=96, draft_slots=shared,
                     draft_rows=pool)
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    # (kind, prompt, tokens asked): speculative and int8 requests interleaved
    jobs = [("spec" if i % 2 else "int8", p, rng.randint(6, 20)) for i, p in enumerate(PROMPTS)]
    jobs += [("int8", "def f(x):", 1)]  # a rider with one token to go rides one draft step
    got: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    samplers: dict[int, Sampler] = {}
    spec_free = [3, 2, 1, 0]
    pending = list(range(len(jobs)))
    rounds = 0
    while pending or row_of:
        if pending and (rng.random() < 0.5 or not row_of):  # join
            j = pending[0]
            kind, prompt, _ = jobs[j]
            if kind == "int8" or spec_free:
                pending.pop(0)
                samplers[j] = Sampler(params) if kind == "spec" else Recording(sampled(j))
                ids = full.encode(prompt)
                if kind == "int8":
                    row_of[j] = pool.take()
                    got[j] = [shared.prefill(row_of[j], ids, samplers[j])]
                else:
                    row_of[j] = spec_free.pop()
                    got[j] = [spec.prefill(row_of[j], ids, samplers[j])]
        live = [j for j in row_of if len(got[j]) < jobs[j][2]]
        mine = [j for j in live if jobs[j][0] == "spec"]
        theirs = [j for j in live if jobs[j][0] == "int8"]
        if mine:  # a round, int8's rows riding
            limits = [jobs[j][2] - len(got[j]) for j in theirs]
            riders = Riders([row_of[j] for j in theirs], [got[j][-1] for j in theirs],
                            [samplers[j] for j in theirs], limits)
            result = spec.step_many([row_of[j] for j in mine], [got[j][-1] for j in mine],
                                    [samplers[j] for j in mine], riders)
            assert not result.failed and not result.riders_failed
            # the riders' share of the draft steps' time is told apart (the router learns
            # the rung's own)
            assert (result.rider_seconds > 0) == any(result.riders)
            for j, made in zip(mine, result.tokens, strict=True):
                got[j] += made
            for j, limit, made in zip(theirs, limits, result.riders, strict=True):
                assert len(made) <= min(limit, k)
                got[j] += made
        elif theirs:  # int8's own step
            made = shared.step([row_of[j] for j in theirs], [got[j][-1] for j in theirs],
                               [samplers[j] for j in theirs])
            for j, t in zip(theirs, made, strict=True):
                got[j].append(t)
        for j in [j for j in row_of if len(got[j]) >= jobs[j][2]]:  # done: leave
            if jobs[j][0] == "int8":
                shared.release(row_of[j])
                pool.give(row_of.pop(j))
            else:
                spec.release(row_of[j])
                spec_free.append(row_of.pop(j))
        rounds += 1
    assert spec.rode > 0  # int8's rows did ride
    assert len(pool) == 8  # every row back: a speculative row's release gave its draft row
    for j, (kind, prompt, n) in enumerate(jobs):
        if kind == "spec":
            assert_same_but_near_ties(got[j][:n], *alone(full, full.encode(prompt), n))
        else:
            assert len(got[j]) == n  # riders never took more than they were allowed
            # every token it sampled came from the logits of its own text so far: int8 alone,
            # teacher-forced on the row's tokens, gives the logits its sampler saw
            sampler = samplers[j]
            assert isinstance(sampler, Recording) and len(sampler.seen) == n
            ids = full.encode(prompt)
            alone_logits = int8.logits(ids + got[j][: n - 1])[len(ids) - 1 :]
            np.testing.assert_allclose(np.stack(sampler.seen), alone_logits, atol=2e-3)


class Recording(Sampler):
    """A row's sampler that keeps the logits it sampled from."""

    def __init__(self, params: GenerationParams) -> None:
        super().__init__(params)
        self.seen: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray) -> int:
        self.seen.append(np.array(logits, dtype=np.float32))
        return super().__call__(logits)


def sampled(seed: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=40, temperature=0.9, seed=seed)


def test_shared_draft_slots_must_belong_to_the_draft_and_have_room(
        engines: dict[str, OrtEngine]) -> None:
    full, int8 = engines["full"], engines["int8"]
    with pytest.raises(ValueError, match="room"):
        SpecSlots(full, int8, 4, max_batch=2, max_len=64,
                  draft_slots=KVSlots(int8, 4, 64), draft_rows=RowPool(4))
    with pytest.raises(ValueError, match="engine"):
        SpecSlots(full, int8, 4, max_batch=2, max_len=64,
                  draft_slots=KVSlots(full, 4, 69), draft_rows=RowPool(4))
