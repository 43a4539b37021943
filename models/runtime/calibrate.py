"""Measure a variant's cost on this host: prefill and decode milliseconds per token."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.manifest import Calibration

if TYPE_CHECKING:
    from telemetry.base import EnergyMeter

@dataclass(frozen=True)
class StepWidths:
    """A batch's decode step measured at a few widths: ms, and watts where a meter read it."""

    ms: dict[int, float]
    watts: dict[int, float]


# The prompt every calibration run decodes from (build time and service start-up alike).
CALIBRATION_PROMPT = "The :mod:`json` module provides functions to encode and decode Python"


def time_generation(
    engine: Engine, prompt_ids: Sequence[int], new_tokens: int
) -> tuple[float, float]:
    """One greedy run ignoring EOS; return (seconds to first token, seconds for the rest)."""
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = None
    for chunk in engine.stream(prompt_ids, params):
        if first is None:
            first = time.perf_counter()
        if chunk.finish_reason:
            break
    end = time.perf_counter()
    assert first is not None
    return first - start, end - first


def calibrate_many(engines: Mapping[str, Engine], prompt_ids: Sequence[int],
                   new_tokens: int = 64, repeats: int = 7, threads: int = 2,
                   device: str = "cpu") -> dict[str, Calibration]:
    """Each engine's median cost over ``repeats`` rounds after a warm-up, the engines taking
    turns within every round: on a shared VM a slow spell (decode rates of one engine moved
    1,100-1,800 tok/s between back-to-back runs here) then falls on all of them alike, so a
    comparison between them is fair. The order rotates from round to round, so that noise
    that recurs with the round's period cannot fall on one engine's every run. (A build's
    race once measured two int8 candidates level, 151 and 152 tok/s, that measured 1.10-1.18x
    apart in nine reruns of this function; the cause was not found, the fixed order was one
    candidate.)"""
    for engine in engines.values():
        time_generation(engine, prompt_ids, min(new_tokens, 8))
    names = list(engines)
    ttfts: dict[str, list[float]] = {name: [] for name in names}
    decodes: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            ttft, rest = time_generation(engines[name], prompt_ids, new_tokens)
            ttfts[name].append(ttft)
            decodes[name].append(rest / max(1, new_tokens - 1))
    out = {}
    for name in engines:
        decode_s = statistics.median(decodes[name])
        out[name] = Calibration(
            prefill_ms_per_token=1000 * statistics.median(ttfts[name]) / len(prompt_ids),
            decode_ms_per_token=1000 * decode_s,
            decode_tokens_per_s=1 / decode_s,
            threads=threads,
            device=device,
        )
    return out


def calibrate(engine: Engine, prompt_ids: Sequence[int], new_tokens: int = 64, repeats: int = 3,
              threads: int = 2, device: str = "cpu") -> Calibration:
    """Median over ``repeats`` runs after one warm-up run."""
    return calibrate_many({"engine": engine}, prompt_ids, new_tokens, repeats, threads,
                          device)["engine"]


STEP_WIDTHS = (1, 2, 3, 4, 8, 16)  # batch widths measured at start-up (linear in between)


def measure_step_widths(engine: Engine, prompt_ids: Sequence[int],
                        widths: Sequence[int] = STEP_WIDTHS, max_batch: int = 16,
                        steps: int = 3, meter: EnergyMeter | None = None) -> StepWidths | None:
    """Milliseconds of one decode step of ``engine``'s continuous batch at each width up to
    ``max_batch`` (a start-up seed of the router's step table, which every observed step then
    refines; not a line: an 8-bit graph's second row costs a kernel switch), and with a
    ``meter`` the device's power over each width's steps (a quantized rung's wide steps run on
    another session than its narrow ones and draw more). For the speculative rung, a round's
    milliseconds per token it gave each row. ``None`` when the engine's rows do not share a
    forward pass (each row then costs a whole step)."""
    from models.runtime.engine.slots import Sampler, slots_for

    widths = sorted({w for w in widths if 1 <= w <= max_batch})
    rows = widths[-1]
    # room for every step's tokens: a speculative round gives up to k + 1, row 0 takes part in
    # every width's steps, and its target keeps k + 1 positions more; fewer steps a width on a
    # short context (none fit: no seed, the router learns the table online)
    per_step = 1 + int(getattr(engine, "k", 0))
    room = engine.context_length - len(prompt_ids) - 2 - per_step
    steps = min(steps, room // ((len(widths) + 1) * per_step))
    if steps < 1:
        return None
    budget = (len(widths) + 1) * steps * per_step + 1
    slots = slots_for(engine, rows, len(prompt_ids) + budget + 1)
    if not slots.batched:
        return None
    params = GenerationParams(max_new_tokens=budget, ignore_eos=True)
    samplers = [Sampler(params) for _ in range(rows)]
    last = [slots.prefill(r, prompt_ids, samplers[r]) for r in range(rows)]
    out = StepWidths({}, {})

    def measure(n: int) -> None:
        times = []
        mark = meter.begin() if meter is not None else None
        for _ in range(steps):
            t0 = time.perf_counter()
            made = slots.step_many(list(range(n)), last[:n], samplers[:n]).tokens
            times.append(1000 * (time.perf_counter() - t0) * n / sum(map(len, made)))
            last[:n] = [m[-1] for m in made]  # per token: a speculative round gives several
        out.ms[n] = statistics.median(times)
        if meter is not None and mark is not None:
            reading = meter.end(mark)
            if reading.seconds > 0:
                out.watts[n] = reading.joules / reading.seconds

    measure(1)  # warm-up
    out.ms.clear()
    out.watts.clear()
    for w in widths:
        measure(w)
    return out


def measure_wide_many(engines: Mapping[str, Engine], prompt_ids: Sequence[int], rows: int = 16,
                      steps: int = 4, repeats: int = 3) -> dict[str, float | None]:
    """Decode tokens/s of each engine's continuous batch with ``rows`` rows in every step,
    the engines taking turns (the order rotating each round; the median of each round's
    ``steps`` steps, then of the rounds). ``None`` for an engine whose rows do not share a
    forward pass. A quantized kernel that is quick for one row can scale worse with rows than
    another (an 8-bit ``MatMulNBits`` step costs 3.5-4x more at 16 rows than at one, fp32
    ``MatMul`` 2x), so a race that serves load measures both."""
    from models.runtime.engine.slots import Sampler, slots_for

    params = GenerationParams(max_new_tokens=(repeats + 1) * steps + 1, ignore_eos=True)
    length = len(prompt_ids) + (repeats + 1) * steps + 2
    state: dict[str, tuple[Any, list[Sampler], list[int]]] = {}
    out: dict[str, float | None] = {}
    for name, engine in engines.items():
        slots = slots_for(engine, rows, length)
        if not slots.batched:
            out[name] = None
            continue
        samplers = [Sampler(params) for _ in range(rows)]
        state[name] = (slots, samplers, [slots.prefill(r, prompt_ids, samplers[r])
                                         for r in range(rows)])
    every = list(range(rows))

    def step_ms(name: str) -> float:
        slots, samplers, last = state[name]
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            last[:] = slots.step(every, last, samplers)
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    names = list(state)
    for name in names:  # warm-up: the first wide step binds and may pick kernels
        slots, samplers, last = state[name]
        last[:] = slots.step(every, last, samplers)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            medians[name].append(step_ms(name))
    out.update({name: rows * 1000 / statistics.median(ms) for name, ms in medians.items()})
    return out
