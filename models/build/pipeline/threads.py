"""Build stage: which rungs the service runs on one core, by measurement.

A cheap rung on one thread decodes a little slower than on two, but the second thread's share
of the work (and its spinning between operators) costs energy; a rung that stays faster than
``full`` on one core still serves every budget ``full`` does. Each rung but ``full`` (the
reference, kept on the build's thread count) decodes the calibration prompt on one thread and on
the build's count, taking turns, on the service's meter; it runs on one core when that costs at
most ``MAX_ENERGY_RATIO`` of its joules per token on the build's count while its one-thread
decode stays at least as fast as ``full``'s (decode: a short prompt, ``new_tokens`` each).
The manifest records each rung's pick
(``serve_threads``) and every measurement (``threads_choice``); the service uses them unless
``GREENROUTE_VARIANT_THREADS`` says otherwise, and a one-core rung still gets a wide session
for wide steps.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.pipeline.decisions import near
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.manifest import Manifest
from telemetry.factory import MeterConfig, create_meter

MAX_ENERGY_RATIO = 0.95  # a saving larger than the measurement's noise (5 %)
PROMPT_TOKENS = 16
RULE = (f"one thread where its joules per token are <= {MAX_ENERGY_RATIO}x its own on the build's "
        "thread count and its one-thread decode is at least full's speed (full: the build's "
        "count)")


def choose_threads(ladder: Path, manifest: Manifest, threads: int, prompt: Sequence[int],
                   new_tokens: int = 64, rounds: int = 3,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every rung of ``ladder`` but ``full`` on one thread and on ``threads``; set each
    variant's ``serve_threads`` in ``manifest``; return the record (``threads_choice``)."""
    record: dict[str, Any] = {"rule": RULE, "threads": threads, "new_tokens": new_tokens,
                              "rounds": rounds, "measured": {}}
    if threads <= 1:
        return {**record, "why": "the build runs on one thread: nothing to choose"}
    tokenizer = Tokenizer.from_file(str(ladder / manifest.tokenizer))
    meter = create_meter(MeterConfig())
    record["energy_source"] = meter.source + (" (an estimate)" if meter.estimated else "")
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompt = list(prompt)[:PROMPT_TOKENS]  # decode is what the choice is about, not prefill

    def engine(name: str, n: int) -> OrtEngine:
        info = manifest.variants[name]
        return OrtEngine(ladder / info.dir / info.file, tokenizer, manifest.context_length,
                         manifest.eos_token_ids, threads=n)

    def run(e: OrtEngine) -> tuple[float, float]:
        mark = meter.begin()
        e.generate(prompt, params)
        reading = meter.end(mark)
        return new_tokens / reading.seconds, reading.joules / new_tokens

    full_speed = statistics.median(run(engine("full", threads))[0] for _ in range(rounds))
    record["full_tokens_per_s"] = round(full_speed, 1)
    for name, info in manifest.variants.items():
        info.serve_threads = None
        if name == "full" or info.speculative is not None:
            continue
        pair = {1: engine(name, 1), threads: engine(name, threads)}
        for e in pair.values():
            e.generate(prompt, GenerationParams(max_new_tokens=4))  # warm-up
        runs: dict[int, list[tuple[float, float]]] = {n: [] for n in pair}
        for attempt in range(2):  # a ratio near the threshold: as many rounds more
            for i in range(rounds):  # taking turns, the order alternating
                for n in (list(pair) if i % 2 == 0 else list(pair)[::-1]):
                    runs[n].append(run(pair[n]))
            speed = {n: statistics.median(r[0] for r in v) for n, v in runs.items()}
            energy = {n: statistics.median(r[1] for r in v) for n, v in runs.items()}
            ratio = energy[1] / energy[threads] if energy[threads] > 0 else 1.0
            if attempt or not near(ratio, MAX_ENERGY_RATIO):
                break
        one = ratio <= MAX_ENERGY_RATIO and speed[1] >= full_speed
        info.serve_threads = 1 if one else None
        record["measured"][name] = {
            "tokens_per_s": {str(n): round(v, 1) for n, v in speed.items()},
            "joules_per_token": {str(n): round(v, 5) for n, v in energy.items()},
            "energy_ratio": round(ratio, 3), "margin": round(MAX_ENERGY_RATIO / ratio, 3),
            "rounds": len(runs[1]), "serve_threads": 1 if one else threads}
        log(f"  {name}: one thread {speed[1]:.0f} tok/s, {ratio:.2f}x the joules per token of "
            f"{threads} ({speed[threads]:.0f} tok/s; full {full_speed:.0f}): "
            f"{'one core' if one else f'{threads} threads'}")
    meter.close()
    return record
