"""The speculative rung: full's greedy tokens exactly, full's sampling distribution exactly, and
rejected drafts leave no trace; on the tiny ladder's real graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.engine.base import GenerationParams
from models.engine.ort import OrtEngine
from models.engine.sampling import distribution
from models.engine.slots import Sampler
from models.engine.speculative import SpecSlots, SpeculativeEngine
from models.ladder import load_ladder
from models.pipeline.speculative import break_even, expected_tokens
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
        counts[slots.step_many([0], [last], [sampler])[0][0]] += 1
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


def test_a_row_with_low_acceptance_stops_drafting(engines: dict[str, OrtEngine]) -> None:
    full = engines["full"]
    # a threshold no row can reach: after its first round the row decodes plainly
    slots = SpecSlots(full, engines["distilled"], k=4, max_batch=2, max_len=96,
                      min_acceptance=1.01)
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    sampler = Sampler(params)
    ids = full.encode(PROMPTS[4])
    got = [slots.prefill(1, ids, sampler)]
    sizes = []
    while len(got) < 40:
        out = slots.step_many([1], [got[-1]], [sampler])[0]
        sizes.append(len(out))
        got += out
    drafted = slots.drafted
    assert drafted == 4 and sizes[1:] == [1] * (len(sizes) - 1)  # plain steps of full
    assert slots.work[-1] == 1
    assert_same_but_near_ties(got[:40], *alone(full, ids, 40))
    slots.step_many([1], [got[-1]], [sampler])
    assert slots.drafted == drafted  # it no longer drafts


def test_expected_tokens_and_break_even() -> None:
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)
    # a round measured 1.5x faster than full at acceptance 0.8: it pays down to the rate whose
    # expected tokens are 1/1.5 of 0.8's
    a = break_even(0.8, 4, 1.5)
    assert expected_tokens(a, 4) == pytest.approx(expected_tokens(0.8, 4) / 1.5, rel=1e-3)
    assert 0 < a < 0.8
