"""The step API: rows of one shared KV buffer decode together, join and leave at any step, and
roll back, and each row's tokens are the ones it would get alone."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from models.runtime.engine.base import ContextOverflowError, GenerationParams
from models.runtime.engine.offline import generate_many
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.slots import KVSlots, Sampler, SerialSlots, slots_for

# Batched and single-row forwards add the same floats in a different order (different GEMM
# shapes), so two continuations can differ where the alone run's best two logits are closer
# than float noise. A row may only differ from its alone run at such a near-tie.
NEAR_TIE = 1e-3


def engine_at(onnx_dir: Path, ckpt: Path) -> OrtEngine:
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0], threads=1)


@pytest.fixture(scope="module")
def engine(random_llama_builder: tuple[Path, Path]) -> OrtEngine:
    ckpt, onnx_dir = random_llama_builder
    return engine_at(onnx_dir, ckpt)


@pytest.fixture(scope="module")
def wide_engine(random_llama_builder: tuple[Path, Path]) -> OrtEngine:
    """One thread for narrow forwards, a second session on two from three rows or tokens."""
    ckpt, onnx_dir = random_llama_builder
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0], threads=1, wide_threads=2,
                     wide_from_rows=3)


PROMPTS = ["Return a new list of the items in", "x", "def f(a, b):", "The quick brown fox",
           "import numpy as np\n", "1 2 3", "While the loop runs, the", "class A:\n    def"]


def alone(engine: OrtEngine, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``ids`` decoded alone, and each step's top-2 logit margin."""
    tokens, margins = [], []
    logits = engine.logits(ids)[-1]
    for _ in range(n):
        top = np.sort(logits)[-2:]
        margins.append(float(top[1] - top[0]))
        tokens.append(int(np.argmax(logits)))
        logits = engine.logits(ids + tokens)[-1]
    return tokens, margins


def assert_same_but_near_ties(got: list[int], want: list[int], margins: list[float]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            assert margins[i] < NEAR_TIE, f"token {i}: {g} != {w} (margin {margins[i]:.4f})"
            return  # after a legitimate near-tie split the continuations differ


@pytest.mark.parametrize("sessions", ["one", "wide"])
def test_rows_joining_and_leaving_get_their_alone_tokens(
        engine: OrtEngine, wide_engine: OrtEngine, sessions: str) -> None:
    """Eight sequences of different lengths and budgets join at different steps into rows of
    a batch of 4, leave when done, and their freed rows are reused at once. With a wide
    session, steps of three rows or more and prompts of three tokens or more run on it, and
    every row still gets its alone tokens (computed on the one-thread session)."""
    batched = wide_engine if sessions == "wide" else engine
    rng = random.Random(7)
    budget = [rng.randint(3, 14) for _ in PROMPTS]
    ids = [engine.encode(p) for p in PROMPTS]
    want = [alone(engine, i, n) for i, n in zip(ids, budget, strict=True)]
    slots = KVSlots(batched, max_batch=4, max_len=64)
    params = GenerationParams(max_new_tokens=32, ignore_eos=True)
    waiting = list(range(len(PROMPTS)))
    running: dict[int, int] = {}  # row -> sequence
    got: dict[int, list[int]] = {i: [] for i in waiting}
    samplers = {i: Sampler(params) for i in waiting}
    joins, step = {0: 0, 1: 0, 2: 3, 3: 5}, 0
    reused = 0
    while waiting or running:
        free = [r for r in range(4) if r not in running]
        while waiting and free and joins.get(waiting[0], step) <= step:
            seq, row = waiting.pop(0), free.pop(0)
            reused += seq >= 4
            got[seq].append(slots.prefill(row, ids[seq], samplers[seq]))
            running[row] = seq
        for row, seq in list(running.items()):
            if len(got[seq]) >= budget[seq]:
                slots.release(row)
                del running[row]
        if running:
            rows = sorted(running)
            out = slots.step(rows, [got[running[r]][-1] for r in rows],
                             [samplers[running[r]] for r in rows])
            for row, token in zip(rows, out, strict=True):
                got[running[row]].append(token)
        step += 1
    assert reused == 4  # the last four ran in rows the first four had freed
    for seq in got:
        assert_same_but_near_ties(got[seq][: budget[seq]], *want[seq])
    if sessions == "wide":  # which session each binding runs on
        assert wide_engine.wide_session is not None
        assert {w: sess is wide_engine.wide_session
                for w, (sess, _) in slots._step_bindings.items()} == {
            w: w >= 3 for w in slots._step_bindings}
        assert any(w >= 3 for w in slots._step_bindings)
        assert {wide for _, wide in slots._forward_bindings} == {
            len(i) >= 3 for i in ids}


def solo(engine: OrtEngine, ids: list[int], params: GenerationParams, n: int) -> list[int]:
    """``n`` tokens of ``ids`` decoded in a row of its own."""
    slots, sampler = KVSlots(engine, 1, 64), Sampler(params)
    tokens = [slots.prefill(0, ids, sampler)]
    for _ in range(n - 1):
        tokens += slots.step([0], tokens[-1:], [sampler])
    return tokens


def test_sampled_rows_keep_their_own_random_streams(engine: OrtEngine) -> None:
    """A seeded row samples the same tokens alone and beside other rows."""
    params = GenerationParams(max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    ids = engine.encode(PROMPTS[0])
    want = solo(engine, ids, params, 12)
    busy = KVSlots(engine, 4, 64)
    others = [Sampler(GenerationParams(temperature=1.0, seed=k)) for k in range(3)]
    last = [busy.prefill(r, engine.encode(PROMPTS[r + 2]), others[r]) for r in range(3)]
    mine = Sampler(params)
    got = [busy.prefill(3, ids, mine)]
    for _ in range(11):
        out = busy.step([0, 1, 2, 3], [*last, got[-1]], [*others, mine])
        last, got = out[:3], got + out[3:]
    assert got == want


def test_rollback_leaves_no_trace(engine: OrtEngine) -> None:
    """Tokens appended and then truncated away (a rejected draft) do not change what follows."""
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    ids = engine.encode(PROMPTS[3])
    want = solo(engine, ids, params, 11)
    s = Sampler(params)
    slots = KVSlots(engine, 1, 64)
    got = [slots.prefill(0, ids, s)]
    for k in range(10):
        if k == 4:  # a draft of five junk tokens, verified and rejected
            length = slots.length(0)
            slots.forward(0, [got[-1], 5, 6, 7, 8])
            slots.truncate(0, length)
        got += slots.step([0], got[-1:], [s])
    assert got == want


def test_a_prompt_part_way_in_below_a_stepping_row_keeps_its_kv(engine: OrtEngine) -> None:
    """A step over rows [0, 2) where row 0 is a prompt part-way in (chunked prefill) and only
    row 1 steps: the graph writes every row of the prefix, and row 0's write must land past
    its tokens, not on its last one (it did: row 0 then continued from a corrupted prompt)."""
    params = GenerationParams(max_new_tokens=8, ignore_eos=True)
    a, b = engine.encode(PROMPTS[6]), engine.encode(PROMPTS[0])
    want = solo(engine, a, params, 6)
    s0, s1 = Sampler(params), Sampler(params)
    slots = KVSlots(engine, 2, 64)
    assert slots.prefill_part(0, a[:3], s0, final=False) is None
    t1 = slots.prefill(1, b, s1)
    for _ in range(3):
        t1 = slots.step([1], [t1], [s1])[0]
    got = [slots.prefill_part(0, a[3:], s0, final=True)]
    for _ in range(5):
        t0, t1 = slots.step([0, 1], [got[-1], t1], [s0, s1])
        got.append(t0)
    assert got == want
    assert slots.mask[0].sum() == slots.length(0)  # the dummy positions were taken back


def test_a_row_cannot_outgrow_its_length(engine: OrtEngine) -> None:
    slots = KVSlots(engine, 2, 8)
    s = Sampler(GenerationParams())
    token = slots.prefill(0, engine.encode("a b c d e f g")[:7], s)
    token = slots.step([0], [token], [s])[0]  # the 8th position
    with pytest.raises(ValueError, match="cannot take a step"):
        slots.step([0], [token], [s])
    with pytest.raises(ValueError, match="in use"):
        slots.prefill(0, [1], s)


def test_concat_graphs_interleave_rows(random_llama: tuple[Path, Path]) -> None:
    """optimum's graphs (no shared buffer) run their rows one after another, same tokens."""
    ckpt, onnx_dir = random_llama
    engine = engine_at(onnx_dir, ckpt)
    slots = slots_for(engine, 3, 64)
    assert isinstance(slots, SerialSlots) and not slots.batched
    params = GenerationParams(max_new_tokens=8, ignore_eos=True)
    ids = [engine.encode(p) for p in PROMPTS[:3]]
    samplers = [Sampler(params) for _ in ids]
    got = [[slots.prefill(r, i, samplers[r])] for r, i in enumerate(ids)]
    for _ in range(7):
        for row, token in enumerate(slots.step([0, 1, 2], [g[-1] for g in got], samplers)):
            got[row].append(token)
    for row, i in enumerate(ids):
        assert got[row] == engine.generate(i, params).token_ids


def test_generate_many_gives_each_prompt_what_it_gets_alone(engine: OrtEngine) -> None:
    """Eight prompts through three rows: some end on a stop sequence, the others at the token
    budget, freed rows take the next prompt, and each result (text, ids, finish reason) is the
    one ``generate`` gives that prompt alone, in the prompts' order."""
    ids = [engine.encode(p) for p in PROMPTS]
    plain = GenerationParams(max_new_tokens=12)
    # a stop sequence taken from the middle of one prompt's own continuation, so it ends early
    stop = engine.generate(ids[0], plain).text[6:9]
    params = GenerationParams(max_new_tokens=12, stop=(stop,))
    got = generate_many(engine, ids, params, max_batch=3)
    assert len(got) == len(ids)
    reasons = {g.finish_reason for g in got}
    assert "stop" in reasons and "length" in reasons
    for prompt, result in zip(ids, got, strict=True):
        want = engine.generate(prompt, params)
        assert result.prompt_tokens == len(prompt)
        if result.token_ids != want.token_ids:  # only at a near-tie (see NEAR_TIE)
            n = min(len(result.token_ids), len(want.token_ids))
            tokens, margins = alone(engine, prompt, n)
            assert_same_but_near_ties(result.token_ids[:n], tokens, margins)
            assert_same_but_near_ties(want.token_ids[:n], tokens, margins)
            continue
        assert (result.text, result.finish_reason) == (want.text, want.finish_reason)


def test_generate_many_checks_every_prompt_before_decoding(engine: OrtEngine) -> None:
    params = GenerationParams(max_new_tokens=8)
    assert generate_many(engine, [], params) == []
    too_long = list(range(1, engine.context_length))
    with pytest.raises(ContextOverflowError):
        generate_many(engine, [engine.encode("x"), too_long], params)


def test_kv_bytes_is_the_worst_case_of_every_layers_k_and_v(tiny_ladder: Path) -> None:
    from models.runtime.ladder import load_ladder

    engine = load_ladder(tiny_ladder, threads=1, only=["full"], warmup=False).engines["full"]
    slots = slots_for(engine, 3, 40)
    assert isinstance(engine, OrtEngine)
    kv = engine.kv
    per_token = len(kv.past_names) * kv.kv_heads * kv.head_dim * np.dtype(kv.kv_dtype).itemsize
    assert slots.kv_bytes == 3 * slots.max_len * per_token


def test_kv_written_bytes_keep_each_rows_longest_reach(tiny_ladder: Path) -> None:
    """The resident part of the KV buffers is every row's longest length so far: a release
    or a rollback does not give pages back, and a row reused for a shorter prompt adds none."""
    from models.runtime.ladder import load_ladder

    engine = load_ladder(tiny_ladder, threads=1, only=["full"], warmup=False).engines["full"]
    slots = slots_for(engine, 3, 40)
    per_token = slots.kv_bytes // (3 * slots.max_len)
    greedy = Sampler(GenerationParams(max_new_tokens=8, temperature=0.0))
    assert slots.kv_written_bytes == 0
    t0 = slots.prefill(0, [5, 6, 7, 8], greedy)
    t1 = slots.prefill(1, [9], greedy)
    slots.step([0, 1], [t0, t1], [greedy, greedy])
    assert slots.kv_written_bytes == (5 + 2) * per_token
    slots.release(0)  # row 0 reached 5
    assert slots.kv_written_bytes == (5 + 2) * per_token
    slots.prefill(0, [9], greedy)  # shorter than before: no new pages
    assert slots.kv_written_bytes == (5 + 2) * per_token
    slots.forward(1, [t1, t1, t1, t1, t1])  # row 1 reaches 7, then rolls back to 3
    slots.truncate(1, 3)
    assert slots.kv_written_bytes == (5 + 7) * per_token
    assert slots.kv_written_bytes <= slots.kv_bytes


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_kv_sized_buffers_cost_memory_only_as_rows_fill() -> None:
    """A KV buffer is sized for every row at full length; only what rows write may be
    resident. After a large free, glibc serves callocs below 32 MB from its heap and zeroes
    them (all resident): 25 MB per layer on SmolLM2 made the default ladder 9.5 GB at start."""
    from models.runtime.engine.session import aligned_zeros

    big = np.ones(30 << 20, np.uint8)  # freed: glibc raises its mmap threshold to 30 MB
    del big
    used = [np.ones(20 << 20, np.uint8) for _ in range(10)]  # now from the heap
    pin = np.ones(1 << 20, np.uint8)  # above them: their space is not trimmed when freed
    del used  # free heap chunks, which a calloc of that size reuses (and must zero)
    before = _rss_mb()
    buffers = [aligned_zeros((5, 1 << 20), np.float32) for _ in range(10)]  # 20 MB each
    assert _rss_mb() - before < 40  # 200 MB asked for
    assert all(int(b.ctypes.data) % 64 == 0 and not b[-1].any() for b in buffers)
    buffers[0][:] = 1.0
    assert _rss_mb() - before >= 15  # written pages are real
    del pin
