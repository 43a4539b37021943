"""The executor on real onnxruntime sessions: continuous batches, cancellation, the energy
ledger's conservation, the energy cap and bounded admission."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from models.runtime.engine.base import Chunk, GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.ladder import load_ladder
from routing.cost import CostModel
from routing.router import Router
from serving.errors import QueueFullError, UnknownVariantError
from serving.events import Chunks, Finished, Skipped
from serving.executor import Executor, ExecutorConfig, Handle
from serving.job import Job
from serving.observer import LaneObserver
from telemetry.base import EnergyMeter
from tests.models.test_slots import PROMPTS, alone, assert_same_but_near_ties


class PowerMeter(EnergyMeter):
    """A device drawing a constant ``watts`` (the hardware boundary): energy = watts x time."""

    source = "fake"

    def __init__(self, watts: float = 50.0) -> None:
        super().__init__()
        self.watts = watts
        self.t0 = time.perf_counter()

    def total_joules(self) -> float:
        return self.watts * (time.perf_counter() - self.t0)


def make_executor(engines: dict[str, Any], observer: LaneObserver | None = None,
                  **config: Any) -> Executor:
    router = Router({n: 1.0 for n in engines}, {n: CostModel(0.1, 1.0, 10.0) for n in engines},
                    reference=next(iter(engines)))
    return Executor(engines, list(engines), router, PowerMeter(), "cpu",
                    ExecutorConfig(**{"max_batch": 4, "max_seq_tokens": 96, **config}), observer)


class Recorder(LaneObserver):
    """Records every report; raises from each when ``broken`` (metrics must not stop serving)."""

    def __init__(self, broken: bool = False) -> None:
        self.reports: list[tuple[str, tuple[Any, ...]]] = []
        self.broken = broken

    def _got(self, name: str, *args: Any) -> None:
        self.reports.append((name, args))
        if self.broken:
            raise RuntimeError(f"{name} failed")

    def request_finished(self, request: Job, finished: Finished) -> None:
        self._got("finished", request.id, finished.completion_tokens)

    def batch_size(self, variant: str, rows: int) -> None:
        self._got("batch", variant, rows)

    def queue_depth(self, waiting: int) -> None:
        self._got("depth", waiting)


@pytest.mark.parametrize("broken", [False, True])
def test_the_observer_hears_each_request_and_cannot_stop_serving(
        builder_engine: OrtEngine, broken: bool) -> None:
    seen = Recorder(broken)
    ex = make_executor({"full": builder_engine}, seen)

    ids = []

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        with ex.lane.admission:  # all three in one turn: three rows at once
            handles = [ex.submit(request(builder_engine, p, 3)) for p in PROMPTS[:3]]
        ids.extend(h.job.id for h in handles)
        return [await collect(h) for h in handles]

    try:
        results = asyncio.run(main())
    finally:
        ex.stop(10)
    assert [kind for _, _, kind in results] == ["finished"] * 3
    finished = [args for name, args in seen.reports if name == "finished"]
    assert sorted(finished) == sorted((i, 3) for i in ids)
    rows = [args[1] for name, args in seen.reports if name == "batch"]
    assert max(rows) == 3 and rows[-1] == 0  # three rows taken, all freed
    assert ("depth", (0,)) in seen.reports


@pytest.fixture(scope="module")
def builder_engine(random_llama_builder: tuple[Path, Path]) -> OrtEngine:
    ckpt, onnx_dir = random_llama_builder
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0], threads=1)


@pytest.fixture()
def executor(builder_engine: OrtEngine) -> Iterator[Executor]:
    ex = make_executor({"full": builder_engine})
    yield ex
    ex.stop(10)


async def collect(handle: Handle) -> tuple[list[Chunk], Finished | None, str]:
    chunks: list[Chunk] = []
    while True:  # as the app reads a handle: event by event until the last
        event = await handle.next()
        if isinstance(event, Chunks):
            chunks += event.chunks
        elif isinstance(event, Finished):
            return chunks, event, "finished"
        else:
            return chunks, None, "skipped" if isinstance(event, Skipped) else "error"
    raise AssertionError("no final event")


def request(engine: OrtEngine, prompt: str, n: int, **kw: Any) -> Job:
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    return Job(engine.encode(prompt), params, kw.pop("variant", "full"), **kw)


def test_requests_joining_a_running_batch_get_their_alone_tokens(
        executor: Executor, builder_engine: OrtEngine) -> None:
    """Eight requests of different lengths arrive while others run, in a batch of four: each
    one's greedy tokens are the ones it gets alone."""
    budgets = [12, 3, 20, 7, 15, 5, 9, 18]

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        tasks = []
        for prompt, n in zip(PROMPTS, budgets, strict=True):
            tasks.append(asyncio.create_task(collect(executor.submit(
                request(builder_engine, prompt, n)))))
            await asyncio.sleep(0.01)  # arrivals spread over the first steps
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for prompt, n, (chunks, fin, kind) in zip(PROMPTS, budgets, results, strict=True):
        assert kind == "finished" and fin is not None and fin.finish_reason == "length"
        assert fin.completion_tokens == n
        got = [c.token_id for c in chunks]
        assert_same_but_near_ties(got, *alone(builder_engine, builder_engine.encode(prompt), n))


def test_cancelling_a_running_request_frees_its_row_at_once(builder_engine: OrtEngine) -> None:
    ex = make_executor({"full": builder_engine}, max_batch=1, queue_size=2)

    async def main() -> tuple[Any, Any]:
        long = ex.submit(request(builder_engine, PROMPTS[0], 80, stream=True))
        waiting = ex.submit(request(builder_engine, PROMPTS[1], 4))
        assert isinstance(await long.next(), Chunks)  # it is running
        long.job.cancel.set()
        return await collect(long), await collect(waiting)

    try:
        (chunks, fin, _), (_, after, kind) = asyncio.run(main())
    finally:
        ex.stop(10)
    assert fin is not None and fin.finish_reason == "cancelled"
    assert fin.completion_tokens < 80
    assert kind == "finished" and after is not None and after.completion_tokens == 4
    assert after.admitted >= fin.admitted  # it got the row the cancelled request freed


def test_per_request_joules_add_up_to_the_devices(executor: Executor,
                                                  builder_engine: OrtEngine) -> None:
    """Over a busy period the requests' ledger shares add up to the device energy over the
    lane's run time (within 1 %)."""
    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        handles = []
        for k, prompt in enumerate(PROMPTS):
            handles.append(executor.submit(request(builder_engine, prompt, 6 + 3 * k)))
            if k % 3 == 2:
                await asyncio.sleep(0.02)
        return await asyncio.gather(*(collect(h) for h in handles))

    results = asyncio.run(main())
    deadline = time.monotonic() + 10
    while executor.lane.ledger.is_open and time.monotonic() < deadline:
        time.sleep(0.01)  # the lane closes its busy period when it runs dry
    joules = [fin.energy.joules for _, fin, _ in results if fin is not None]
    assert len(joules) == len(PROMPTS) and min(joules) > 0
    device = executor.lane.ledger.busy_joules
    assert sum(joules) == pytest.approx(device, rel=0.01)
    # and a longer request is charged more than a shorter one that ran beside it
    assert joules[-1] > joules[0]
    assert all(fin.energy.source == "fake" and "ledger share" in (fin.energy.note or "")
               for _, fin, _ in results if fin is not None)


def test_max_joules_stops_generation(executor: Executor, builder_engine: OrtEngine) -> None:
    capped = request(builder_engine, PROMPTS[0], 70, max_joules=0.05)  # 1 ms at 50 W

    async def main() -> tuple[list[Chunk], Finished | None, str]:
        return await collect(executor.submit(capped))

    chunks, fin, _ = asyncio.run(main())
    assert fin is not None and fin.finish_reason == "energy"
    assert 1 <= fin.completion_tokens < 70
    assert fin.energy.joules >= 0.05
    assert chunks[-1].finish_reason == "energy"


def test_a_full_executor_refuses_at_once(builder_engine: OrtEngine) -> None:
    ex = make_executor({"full": builder_engine}, max_batch=1, queue_size=1)

    async def main() -> None:
        running = ex.submit(request(builder_engine, PROMPTS[0], 80, stream=True))
        await running.next()  # running: the row is taken
        queued = ex.submit(request(builder_engine, PROMPTS[1], 80))
        with pytest.raises(QueueFullError) as err:  # raised by submit itself: nothing awaited
            ex.submit(request(builder_engine, PROMPTS[2], 4))
        assert err.value.retry_after_s >= 1
        with pytest.raises(UnknownVariantError):
            ex.submit(request(builder_engine, PROMPTS[2], 4, variant="nope"))
        running.job.cancel.set()
        queued.job.cancel.set()
        assert (await collect(queued))[2] in ("skipped", "finished")

    try:
        asyncio.run(main())
    finally:
        ex.stop(10)


def test_two_variants_share_the_lane(tiny_ladder: Path) -> None:
    """Requests on two variants interleave on one lane; each gets its own variant's tokens."""
    ladder = load_ladder(tiny_ladder, threads=1, only=["full", "distilled"], warmup=False)
    ex = make_executor(ladder.engines)
    assert {n: s["batching"] for n, s in ex.stats().items()} == {"full": "shared-kv-batch",
                                                                "distilled": "shared-kv-batch"}
    jobs = [("full", "def main():", 10), ("distilled", "import os", 12),
            ("full", "x = 1", 6), ("distilled", "class A:", 8)]

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        handles = [ex.submit(Job(ladder.engines[v].encode(p),
                                     GenerationParams(max_new_tokens=n, ignore_eos=True), v))
                   for v, p, n in jobs]
        return await asyncio.gather(*(collect(h) for h in handles))

    try:
        results = asyncio.run(main())
    finally:
        ex.stop(10)
    for (v, p, n), (chunks, fin, _) in zip(jobs, results, strict=True):
        engine = ladder.engines[v]
        assert fin is not None and fin.completion_tokens == n
        assert_same_but_near_ties([c.token_id for c in chunks],
                                  *alone(engine, engine.encode(p), n))  # type: ignore[arg-type]


def serve_all(ex: Executor, engine: OrtEngine, jobs: list[tuple[str, str, int]]
              ) -> list[tuple[list[Chunk], Finished | None, str]]:
    """Every (variant, prompt, new tokens) job submitted in the lane's first turn (greedy, EOS
    ignored), each read to its end; then the lane idle (its ledger closed) and stopped."""
    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        with ex.lane.admission:
            handles = [ex.submit(Job(engine.encode(p),
                                     GenerationParams(max_new_tokens=n, ignore_eos=True), v))
                       for v, p, n in jobs]
        return await asyncio.gather(*(collect(h) for h in handles))

    try:
        results = asyncio.run(main())
        deadline = time.monotonic() + 10
        while ex.lane.ledger.is_open and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        ex.stop(10)
    return results


def test_speculative_rows_give_fulls_tokens_and_exact_lengths(tiny_ladder: Path) -> None:
    """The speculative rung in the executor: rows get several tokens a step, yet every request
    stops at its own max_new_tokens with full's tokens, and the ledger still adds up."""
    from models.runtime.engine.speculative import SpeculativeEngine

    ladder = load_ladder(tiny_ladder, threads=1, runtime="onnxruntime", warmup=False,
                         only=["full", "int8"])
    full = ladder.engines["full"]
    assert isinstance(full, OrtEngine)
    spec = SpeculativeEngine(full, ladder.engines["int8"], 3)  # type: ignore[arg-type]
    ex = make_executor({"full-speculative": spec})
    assert {n: s["batching"] for n, s in ex.stats().items()} == {"full-speculative":
                                                                "speculative"}
    jobs = [("def main():", 11), ("import os", 7), ("x = 1", 16), ("class A:", 5)]
    results = serve_all(ex, full, [("full-speculative", p, n) for p, n in jobs])
    for (p, n), (chunks, fin, _) in zip(jobs, results, strict=True):
        assert fin is not None and fin.completion_tokens == n and len(chunks) == n
        assert_same_but_near_ties([c.token_id for c in chunks], *alone(full, full.encode(p), n))
    stats = ex.stats()["full-speculative"]
    assert stats["drafted"] > 0 and 0 < stats["acceptance_rate"] <= 1
    joules = sum(fin.energy.joules for _, fin, _ in results if fin is not None)
    assert joules == pytest.approx(ex.lane.ledger.busy_joules, rel=0.01)


def test_the_draft_rungs_rows_ride_the_speculative_rungs_draft_steps(tiny_ladder: Path) -> None:
    """``full``, ``int8`` and the speculative rung drafting with ``int8`` (the same engine) on
    one lane: the rung keeps its draft rows in ``int8``'s KV buffer and ``int8``'s rows take
    tokens on its draft steps. Every request gets its own rung's tokens and length, each batch
    still runs at most ``max_batch`` rows, and the ledger adds up."""
    from models.runtime.engine.speculative import SpecSlots, SpeculativeEngine

    ladder = load_ladder(tiny_ladder, threads=1, runtime="onnxruntime", warmup=False,
                         only=["full", "int8"])
    full, int8 = ladder.engines["full"], ladder.engines["int8"]
    assert isinstance(full, OrtEngine) and isinstance(int8, OrtEngine)
    ex = make_executor({"full": full, "int8": int8,
                        "full-speculative": SpeculativeEngine(full, int8, 3)})
    spec_batch = ex.lane.batches["full-speculative"]
    assert spec_batch.rides == "int8"
    assert ex.stats()["int8"]["max_batch"] == 4
    jobs = [(v, p, n) for v in ("full-speculative", "int8")
            for p, n in [("def main():", 14), ("import os", 9), ("x = 1", 20),
                         ("class A:", 6)]]

    results = serve_all(ex, full, jobs)
    for (v, p, n), (chunks, fin, _) in zip(jobs, results, strict=True):
        assert fin is not None and fin.completion_tokens == n and len(chunks) == n
        engine = full if v == "full-speculative" else int8
        assert_same_but_near_ties([c.token_id for c in chunks], *alone(engine, full.encode(p), n))
    slots = spec_batch.slots
    assert isinstance(slots, SpecSlots) and slots.rode > 0
    assert len(ex.lane.batches["int8"].pool or []) == 8  # the shared buffer's rows all free
    joules = sum(fin.energy.joules for _, fin, _ in results if fin is not None)
    assert joules == pytest.approx(ex.lane.ledger.busy_joules, rel=0.01)


class RecordingRouter(Router):
    """The real router, keeping the order of the steps the lane reports."""

    def __init__(self, names: list[str]) -> None:
        super().__init__({n: 1.0 for n in names}, {n: CostModel(0.1, 1.0, 10.0) for n in names},
                         reference=names[0])
        self.steps: list[tuple[str, int, bool]] = []

    def observe_step(self, variant: str, width: int, ms: float, switched: bool = False) -> None:
        self.steps.append((variant, width, switched))
        super().observe_step(variant, width, ms, switched)


def test_round_robin_is_exact_and_switches_are_reported_apart(tiny_ladder: Path) -> None:
    """Three variants busy, one leaving early: no variant ever steps twice while another has
    rows waiting for its turn, the cyclic order never shifts, and a step that follows another
    variant's is reported as switched (its extra time is not the step table's)."""
    names = ["full", "int8", "distilled"]
    ladder = load_ladder(tiny_ladder, threads=1, only=names, warmup=False)
    router = RecordingRouter(names)
    ex = Executor(ladder.engines, names, router, PowerMeter(), "cpu",
                  ExecutorConfig(max_batch=4, max_seq_tokens=96))
    jobs = [("full", 24), ("full", 24), ("int8", 6), ("distilled", 24)]

    async def main() -> None:
        with ex.lane.admission:  # all four in the lane's first turn (else a race decides)
            handles = [ex.submit(Job(ladder.engines[v].encode("def main():"),
                                         GenerationParams(max_new_tokens=n, ignore_eos=True),
                                         v))
                       for v, n in jobs]
        await asyncio.gather(*(collect(h) for h in handles))

    try:
        asyncio.run(main())
    finally:
        ex.stop(10)
    order = [v for v, _, _ in router.steps]
    assert order.count("int8") == 5 and order.count("full") == order.count("distilled") == 23
    # while all three are busy, every window of three steps holds each once, in a fixed order
    last_int8 = max(i for i, v in enumerate(order) if v == "int8")
    first = max(order.index(v) for v in names)
    cycles = order[first - 2 : last_int8 + 1]
    assert all(sorted(cycles[i : i + 3]) == sorted(names) for i in range(len(cycles) - 2))
    # afterwards the two left alternate strictly
    rest = order[last_int8 + 1 :]
    assert all(a != b for a, b in zip(rest, rest[1:], strict=False))
    # interleaved steps are switched; a full batch's width is its two rows
    assert all(switched for v, _, switched in router.steps[first + 1 :])
    assert {w for v, w, _ in router.steps if v == "full"} == {2}


def test_requests_joules_lie_between_the_busy_and_the_device_energy(tiny_ladder: Path) -> None:
    """Sixteen concurrent requests on two variants at once: over the window their ledger
    joules never exceed the device counter's and are at least 97 % of its busy joules."""
    names = ["full", "distilled"]
    ladder = load_ladder(tiny_ladder, threads=1, only=names, warmup=False)
    meter = PowerMeter()
    router = Router({n: 1.0 for n in names}, {n: CostModel(0.1, 1.0, 10.0) for n in names},
                    reference="full")
    ex = Executor(ladder.engines, names, router, meter, "cpu",
                  ExecutorConfig(max_batch=8, max_seq_tokens=96, queue_size=16))

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        handles = [ex.submit(Job(ladder.engines[names[k % 2]].encode(PROMPTS[k % 4]),
                                     GenerationParams(max_new_tokens=8 + 3 * k,
                                                      ignore_eos=True), names[k % 2]))
                   for k in range(16)]
        return await asyncio.gather(*(collect(h) for h in handles))

    device0, busy0 = meter.total_joules(), ex.lane.ledger.busy_joules
    try:
        results = asyncio.run(main())
        deadline = time.monotonic() + 10
        while ex.lane.ledger.is_open and time.monotonic() < deadline:
            time.sleep(0.01)
        device = meter.total_joules() - device0
        busy = ex.lane.ledger.busy_joules - busy0
    finally:
        ex.stop(10)
    joules = sum(fin.energy.joules for _, fin, _ in results if fin is not None)
    assert all(fin is not None for _, fin, _ in results)
    assert joules <= device
    assert joules >= 0.97 * busy


class BrokenMeter(PowerMeter):
    """The hardware boundary: a counter that fails once ``broken`` is set."""

    broken = False

    def total_joules(self) -> float:
        if self.broken:
            raise OSError("energy counter read failed")
        return super().total_joules()


def test_a_lane_that_dies_fails_what_it_holds_and_takes_nothing_new(
        builder_engine: OrtEngine) -> None:
    """A fault outside any one step (here the meter, read when the lane opens its busy period)
    kills the lane: every held request gets LaneFailedError at once (none hangs until its
    timeout), new submissions are refused, and ``failed`` tells the health check."""
    from serving.errors import LaneFailedError

    meter = BrokenMeter()
    router = Router({"full": 1.0}, {"full": CostModel(0.1, 1.0, 10.0)})
    ex = Executor({"full": builder_engine}, ["full"], router, meter, "cpu",
                  ExecutorConfig(max_batch=2, max_seq_tokens=96, queue_size=8))
    meter.broken = True

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        # all four are queued before the lane can take any (holding its lock; it is
        # reentrant): otherwise the lane may die after the first and refuse the others
        with ex.lane.admission:
            handles = [ex.submit(request(builder_engine, p, 20)) for p in PROMPTS[:4]]
        return await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 30)

    async def again() -> None:
        ex.submit(request(builder_engine, PROMPTS[0], 4))

    try:
        results = asyncio.run(main())
        assert [kind for _, _, kind in results] == ["error"] * 4
        assert isinstance(ex.lane.failed, LaneFailedError)
        with pytest.raises(LaneFailedError):
            asyncio.run(again())
    finally:
        ex.stop(5)


class PoisonedSession:
    """Fault injection around the real session: after a real step, one row's logits turn NaN
    (as a numerical fault in that row alone would)."""

    def __init__(self, real: Any, slots: Any, row: int) -> None:
        self.real = real
        self.slots = slots
        self.row = row

    def run_with_iobinding(self, binding: Any, *args: Any) -> None:
        self.real.run_with_iobinding(binding, *args)
        self.slots._logits[self.row] = float("nan")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class PoisonedEngine:
    """The slots' engine, every session of it poisoned (see :class:`PoisonedSession`)."""

    def __init__(self, slots: Any, row: int) -> None:
        self.real = slots.ort_engine
        self.session = PoisonedSession(self.real.session, slots, row)

    def session_for(self, rows: int) -> PoisonedSession:
        return self.session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_row_with_bad_logits_fails_alone(builder_engine: OrtEngine) -> None:
    ex = make_executor({"full": builder_engine})
    slots = ex.lane.batches["full"].slots
    slots.ort_engine = PoisonedEngine(slots, row=1)  # type: ignore[attr-defined]
    prompts = PROMPTS[:3]

    async def main() -> list[tuple[list[Chunk], Finished | None, str]]:
        with ex.lane.admission:  # all three in one turn: row 1 is in use
            handles = [ex.submit(request(builder_engine, p, 12)) for p in prompts]
        return await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 30)

    try:
        results = asyncio.run(main())
    finally:
        ex.stop(10)
    kinds = [kind for _, _, kind in results]
    assert kinds.count("error") == 1 and kinds.count("finished") == 2
    for p, (chunks, fin, kind) in zip(prompts, results, strict=True):
        if kind == "finished":  # the healthy rows kept going, with their alone tokens
            assert fin is not None and fin.completion_tokens == 12
            assert_same_but_near_ties([c.token_id for c in chunks],
                                      *alone(builder_engine, builder_engine.encode(p), 12))
    assert ex.lane.failed is None


def test_a_step_returns_its_rows_results_and_failures(builder_engine: OrtEngine) -> None:
    """``step_many`` returns what the step gave each row (a StepResult: tokens, work, the
    rows whose sampling failed) instead of leaving it on the slots; ``step`` raises."""
    from models.runtime.engine.slots import KVSlots, Sampler

    slots = KVSlots(builder_engine, 3, 64)
    params = GenerationParams(max_new_tokens=8, ignore_eos=True)
    samplers = [Sampler(params) for _ in range(3)]
    last = [slots.prefill(r, builder_engine.encode(PROMPTS[r]), samplers[r]) for r in range(3)]
    slots.ort_engine = PoisonedEngine(slots, row=1)  # type: ignore[assignment]
    result = slots.step_many([0, 1, 2], last, samplers)
    assert list(result.failed) == [1] and result.work == [1, 1, 1]
    assert len(result.tokens) == 3 and all(len(t) == 1 for t in result.tokens)
    assert not hasattr(slots, "failed") and not hasattr(slots, "work")
    with pytest.raises(ValueError, match="logits"):
        slots.step([0, 1, 2], [t[0] for t in result.tokens], samplers)


def test_the_lane_enforces_the_request_timeout_itself(builder_engine: OrtEngine) -> None:
    """Without anyone reading its events: a request past its timeout before it gets a row is
    skipped, and a running one is stopped at the next step (its row freed)."""
    ex = make_executor({"full": builder_engine})

    async def main() -> tuple[str, str, int]:
        late = request(builder_engine, PROMPTS[0], 40, timeout_at=time.perf_counter() - 1)
        skipped = await collect(ex.submit(late))
        running = ex.submit(request(builder_engine, PROMPTS[1], 80, stream=True))
        assert isinstance(await running.next(), Chunks)  # its first token: it holds a row
        running.job.timeout_at = time.perf_counter()  # now past due
        chunks, fin, _ = await collect(running)
        assert fin is not None
        return skipped[2], fin.finish_reason, fin.completion_tokens

    try:
        skipped, reason, produced = asyncio.run(main())
    finally:
        ex.stop(10)
    assert skipped == "skipped"
    assert reason == "cancelled" and produced < 80
    assert not ex.lane.batches["full"].running


class EventRouter(Router):
    """The real router, keeping the order of the prefills and steps the lane reports."""

    def __init__(self) -> None:
        super().__init__({"full": 1.0}, {"full": CostModel(0.1, 1.0, 10.0)})
        self.events: list[tuple[str, int]] = []

    def observe_prefill(self, variant: str, prompt_tokens: int, ms: float) -> None:
        self.events.append(("prefill", prompt_tokens))
        super().observe_prefill(variant, prompt_tokens, ms)

    def observe_step(self, variant: str, width: int, ms: float, switched: bool = False) -> None:
        self.events.append(("step", width))
        super().observe_step(variant, width, ms, switched)


def test_a_long_prompt_is_prefilled_in_parts_between_the_running_rows_steps(
        builder_engine: OrtEngine) -> None:
    """With a budget of 8 prompt tokens a turn, a 60-token prompt goes in over 8 turns while
    the running row keeps stepping in between, and its answer is what it is alone."""
    router = EventRouter()
    ex = Executor({"full": builder_engine}, ["full"], router, PowerMeter(), "cpu",
                  ExecutorConfig(max_batch=4, max_seq_tokens=96, prefill_token_budget=8))
    long_ids = (builder_engine.encode(" ".join(PROMPTS)) * 4)[:60]
    params = GenerationParams(max_new_tokens=10, ignore_eos=True)

    async def main() -> tuple[list[Chunk], Finished | None, str]:
        running = ex.submit(request(builder_engine, PROMPTS[0], 80, stream=True))
        await running.next()  # it holds a row and steps
        router.events.clear()
        result = await collect(ex.submit(Job(long_ids, params, "full")))
        running.job.cancel.set()
        await collect(running)
        return result

    try:
        chunks, fin, _ = asyncio.run(main())
    finally:
        ex.stop(10)
    parts = [n for kind, n in router.events if kind == "prefill"]
    assert parts == [8] * 7 + [4]
    parts_at = [i for i, (kind, _) in enumerate(router.events) if kind == "prefill"]
    between = router.events[parts_at[0] : parts_at[-1]]
    assert sum(kind == "step" for kind, _ in between) >= len(parts_at) - 1  # one a turn
    assert fin is not None and fin.completion_tokens == 10
    assert_same_but_near_ties([c.token_id for c in chunks],
                              *alone(builder_engine, long_ids, 10))  # type: ignore[arg-type]


def test_every_forward_teaches_the_router_its_power_at_its_width_and_lengths(
        builder_engine: OrtEngine) -> None:
    """The device draws 50 W (the meter); the router was seeded at 10 W. After four requests
    in one batch of four, the power at the widths their steps ran at and for prefills has moved
    toward 50 W, widths no step ran at have not, and the answers' lengths were learnt."""
    ex = make_executor({"full": builder_engine})

    async def main() -> None:
        handles = [ex.submit(request(builder_engine, PROMPTS[i], 12)) for i in range(4)]
        for h in handles:
            await collect(h)

    try:
        asyncio.run(main())
    finally:
        ex.stop(10)
    cost = ex.router.coefficients()["full"]
    watts = cost["watts_by_rows"]
    assert isinstance(watts, list)
    assert max(watts[:4]) > 20.0  # some width from 1 to 4 ran and learnt the meter's 50 W
    assert watts[15] == pytest.approx(10.0)  # nothing ran 16 wide
    assert cost["prefill_watts"] > 20.0
    # each used all of its bound of 12 (ignore_eos), in the class of bounds up to 16
    assert ex.router.lengths() == {"16": {"fraction": 1.0, "answers": 4}}


def test_admit_routes_and_queues_in_one_step_under_the_lanes_lock(
        builder_engine: OrtEngine) -> None:
    """While one admission holds the lane's admission lock, another cannot route (it would
    read a load the first is about to change); once released it goes on, and each gets the
    router's decision with its handle."""
    from routing.policy import Budget

    ex = make_executor({"full": builder_engine})
    budget = Budget(60_000, 0.0)
    done = threading.Event()
    got: list[Any] = []

    async def second() -> None:
        d, h = ex.admit(lambda v: request(builder_engine, PROMPTS[1], 4, variant=v), budget,
                        4, 4)
        got.append(d)
        done.set()
        await collect(h)

    try:
        with ex.lane.admission:
            t = threading.Thread(target=lambda: asyncio.run(second()))
            t.start()
            assert not done.wait(0.3)  # blocked behind the held lock
        assert done.wait(30)
        t.join(30)
        assert got[0].variant == "full" and got[0].reason == "cheapest_feasible"
    finally:
        ex.stop(10)


def test_concurrent_admits_never_overfill_rows_or_queue(builder_engine: OrtEngine) -> None:
    """Twelve admissions at once into a lane held at the start of its work (its meter gated):
    exactly the batch's two rows' worth are taken and the rest are refused with
    QueueFullError naming the variant they were routed to; none is lost or double-counted."""
    from routing.policy import Budget

    class Gated(PowerMeter):
        gate = threading.Event()

        def total_joules(self) -> float:
            self.gate.wait(30)
            return super().total_joules()

    meter = Gated()
    router = Router({"full": 1.0}, {"full": CostModel(0.1, 1.0, 10.0)})
    ex = Executor({"full": builder_engine}, ["full"], router, meter, "cpu",
                  ExecutorConfig(max_batch=2, max_seq_tokens=96, queue_size=2))
    outcomes: list[str] = []
    lock = threading.Lock()
    decided = threading.Semaphore(0)

    def one(i: int) -> None:
        async def go() -> None:
            try:
                _, handle = ex.admit(
                    lambda v: request(builder_engine, PROMPTS[i % 4], 4, variant=v),
                    Budget(60_000, 0.0), 4, 4)
            except QueueFullError as err:
                kind, handle = f"full:{err.variant}", None
            else:
                kind = "admitted"
            with lock:
                outcomes.append(kind)
            decided.release()
            if handle is not None:  # keep its loop alive until it has run
                await collect(handle)
        asyncio.run(go())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert decided.acquire(timeout=30)
        admitted = outcomes.count("admitted")
        assert admitted == ex.lane.depth  # all still waiting: the lane is held
        # the batch has 2 rows and the lane admits none into them while held: the first two
        # are promised a row, every later one finds the queue (2) full, whatever the order
        assert admitted == 2
        assert set(outcomes) - {"admitted"} == {"full:full"}
    finally:
        Gated.gate.set()
        for t in threads:
            t.join(30)
        ex.stop(10)
