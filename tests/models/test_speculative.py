"""The speculative rung: full's greedy tokens exactly, full's sampling distribution exactly, and
rejected drafts leave no trace; on the tiny ladder's real graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.sampling import distribution
from models.runtime.engine.slots import Sampler
from models.runtime.engine.speculative import (
    MAX_PAUSE_TOKENS,
    PAUSE_TOKENS,
    SpecSlots,
    SpeculativeEngine,
    k_for,
)
from models.runtime.ladder import load_ladder
from models.runtime.manifest import SpeculativeInfo, break_even
from tests.models.test_slots import alone, assert_same_but_near_ties

PROMPTS = ["def main():", "import json\n\n", "The json module can", "x",
           "Return a new list of the items in the order they were"]


@pytest.fixture(scope="module")
def engines(tiny_ladder: Path) -> dict[str, OrtEngine]:
    ladder = load_ladder(tiny_ladder, threads=1, runtime="onnxruntime", warmup=False,
                         only=["full", "int8", "distilled"])
    return {n: e for n, e in ladder.engines.items() if isinstance(e, OrtEngine)}


@pytest.mark.parametrize("draft", ["int8", "distilled"])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_output_is_fulls(engines: dict[str, OrtEngine], draft: str, k: int) -> None:
    full = engines["full"]
    spec = SpeculativeEngine(full, engines[draft], k)
    for n, prompt in enumerate(PROMPTS):
        ids = full.encode(prompt)
        new = 8 + 4 * n  # different lengths: rounds end at every offset of the budget
        got = spec.generate(ids, GenerationParams(max_new_tokens=new, ignore_eos=True))
        assert len(got.token_ids) == new
        assert_same_but_near_ties(got.token_ids, *alone(full, ids, new))
    assert spec.drafted > 0
    if draft == "distilled":  # a weak draft: rejections (and rollbacks) happened
        assert spec.accepted < spec.drafted


def test_sampled_tokens_follow_fulls_distribution(engines: dict[str, OrtEngine]) -> None:
    """The first token of a round, over 3,000 seeded rounds with a weak draft (many
    rejections, so both the acceptance test and the residual draw matter), is distributed as
    full's own next token: chi-square below dof + 6 sd (fixed seeds: deterministic)."""
    full, draft = engines["full"], engines["distilled"]
    params = GenerationParams(max_new_tokens=8, temperature=1.0)
    ids = full.encode("The json module can")
    last = full.encode(" parse")[-1]
    p = distribution(full.logits([*ids, last])[-1], params)
    slots = SpecSlots(full, draft, k=2, max_batch=1, max_len=64)
    n = 3000
    counts = np.zeros_like(p)
    for trial in range(n):
        sampler = Sampler(GenerationParams(max_new_tokens=8, temperature=1.0, seed=trial))
        slots.prefill(0, ids, sampler)
        counts[slots.step_many([0], [last], [sampler]).tokens[0][0]] += 1
        slots.release(0)
    assert slots.accepted < 0.9 * slots.drafted  # the rejection path was taken often
    expected = n * p
    big = expected >= 5  # categories too rare for chi-square are pooled into one
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 5
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_a_row_with_low_acceptance_pauses_then_drafts_again(
        engines: dict[str, OrtEngine]) -> None:
    full = engines["full"]
    # a threshold no row can reach: every round is followed by a pause of plain steps, each
    # pause twice the last, and the tokens stay full's own throughout
    slots = SpecSlots(full, engines["distilled"], k=4, max_batch=2, max_len=160,
                      min_acceptance=1.01)
    params = GenerationParams(max_new_tokens=120, ignore_eos=True)
    sampler = Sampler(params)
    ids = full.encode(PROMPTS[4])
    got = [slots.prefill(1, ids, sampler)]
    drafted_per_step = []
    while len(got) < 120:
        before = slots.drafted
        got += slots.step_many([1], [got[-1]], [sampler]).tokens[0]
        drafted_per_step.append(slots.drafted - before)
    # a round (4 drafts), 8 plain steps, a round, 16 plain, a round, 32 plain, a round, ...
    pattern = "".join("R" if d else "." for d in drafted_per_step)
    assert all(d in (0, 4) for d in drafted_per_step)
    runs = [len(r) for r in pattern.split("R")[1:-1]]
    assert runs[:3] == [PAUSE_TOKENS, 2 * PAUSE_TOKENS, 4 * PAUSE_TOKENS], pattern
    assert pattern.startswith("R")
    assert_same_but_near_ties(got[:120], *alone(full, ids, 120))
    assert MAX_PAUSE_TOKENS >= 4 * PAUSE_TOKENS


def test_a_row_that_drafts_well_never_pauses(engines: dict[str, OrtEngine]) -> None:
    full = engines["full"]
    # full drafting for itself keeps (all but near-tie) drafts: every step is a round
    slots = SpecSlots(full, full, k=3, max_batch=1, max_len=96, min_acceptance=0.5)
    sampler = Sampler(GenerationParams(max_new_tokens=40, ignore_eos=True))
    ids = full.encode(PROMPTS[0])
    got = [slots.prefill(0, ids, sampler)]
    steps = 0
    while len(got) < 40:
        got += slots.step_many([0], [got[-1]], [sampler]).tokens[0]
        steps += 1
    assert slots.drafted == 3 * steps
    assert slots.accepted >= 0.9 * slots.drafted


def test_break_even_acceptance() -> None:
    # a round of 4 drafts measured 1.5x plain decoding at acceptance 0.8 yields 1 + 3.2 tokens
    # for the cost of 4.2 / 1.5 = 2.8 plain steps: it pays down to 1 + 4a = 2.8, a = 0.45
    assert break_even(0.8, 4, 1.5) == pytest.approx(0.45)
    assert break_even(0.8, 4, 1.0) == pytest.approx(0.8)  # no faster: no slack
    assert break_even(0.9, 4, 10.0) == 0.0  # even a round keeping nothing pays
    info = SpeculativeInfo(target="full", draft="int8", k=4, acceptance_rate=0.8, speedup=1.5,
                           min_acceptance=0.99)  # a stored value from older code is ignored
    assert info.min_acceptance == pytest.approx(0.45)
    assert info.model_dump()["min_acceptance"] == pytest.approx(0.45)


@pytest.mark.parametrize("verify", ["batched", "alone"])
@pytest.mark.parametrize("draft", ["int8", "distilled"])
def test_batched_rounds_give_every_row_fulls_tokens_as_rows_come_and_go(
        engines: dict[str, OrtEngine], draft: str, verify: str) -> None:
    """Rows share every round (the draft steps them together, the target verifies them in one
    forward of its verify graph, or row by row without it): rows join between rounds, leave
    mid-way (released, their row reused), one is far ahead of the others; each row's greedy
    tokens are full's alone. With the weak draft rows are rejected at their first token; a row
    may get several tokens a round and the caller keeps only what it asked for."""
    full = engines["full"]
    slots = SpecSlots(full, engines[draft], 4, max_batch=4, max_len=96,
                      batched_verify=verify == "batched")
    assert (slots.target.verify_positions == 5) == (verify == "batched")
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    want_n = {0: 24, 1: 16, 2: 30, 3: 26, 4: 20}  # per prompt: tokens it asks for
    got: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    samplers: dict[int, Sampler] = {}
    pending = list(range(len(PROMPTS)))
    free = [3, 2, 1, 0]
    rounds = 0
    while pending or row_of:
        if pending and free and (rounds % 2 == 0 or not row_of):  # join every other round
            p = pending.pop(0)
            row_of[p] = free.pop()
            samplers[p] = Sampler(params)
            got[p] = [slots.prefill(row_of[p], full.encode(PROMPTS[p]), samplers[p])]
        ps = [p for p in row_of if len(got[p]) < want_n[p]]
        if ps:
            made = slots.step_many([row_of[p] for p in ps], [got[p][-1] for p in ps],
                                   [samplers[p] for p in ps]).tokens
            assert all(1 <= len(m) <= slots.k + 1 for m in made)
            for p, m in zip(ps, made, strict=True):
                got[p] += m
        for p in [p for p in row_of if len(got[p]) >= want_n[p]]:  # done: leave, row reused
            slots.release(row_of[p])
            free.append(row_of.pop(p))
        rounds += 1
    for p, prompt in enumerate(PROMPTS):
        ids = full.encode(prompt)
        mine = got[p][: want_n[p]]  # a stop inside a round's accepted tokens: the rest dropped
        assert_same_but_near_ties(mine, *alone(full, ids, want_n[p]))
    assert slots.drafted > 0
    if draft == "distilled":
        assert slots.accepted < slots.drafted


def test_k_follows_the_run_of_agreement_acceptance_predicts() -> None:
    assert [k_for(a, 5) for a in (1.0, 0.9, 0.75, 0.5, 0.2, 0.0)] == [5, 5, 4, 2, 1, 1]
    assert k_for(0.95, 3) == 3
