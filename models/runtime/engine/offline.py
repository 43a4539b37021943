"""Offline batched generation: many prompts through one variant's continuous batch (the
build's task score uses it; the serving executor runs a loop of the same shape with admission,
deadlines, energy shares and cancellation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from models.runtime.engine.base import (
    Engine,
    GenerationParams,
    GenerationResult,
    OutputStream,
    ResultBuilder,
)
from models.runtime.engine.slots import Sampler, slots_for


@dataclass
class _Sequence:
    """One prompt of :func:`generate_many` while it holds a row."""

    index: int  # in the caller's list
    out: OutputStream
    sampler: Sampler
    result: ResultBuilder
    last: int = -1  # the token the next step feeds

    def push(self, token: int) -> GenerationResult | None:
        """Take one generated token; the whole result once the sequence has ended (the same
        text, ids and reason as :meth:`Engine.generate`)."""
        chunk = self.out.push(token)
        self.last = token
        self.result.add(chunk)
        return self.result.result() if chunk.finish_reason else None


def generate_many(engine: Engine, prompts: Sequence[Sequence[int]], params: GenerationParams,
                  max_batch: int = 8) -> list[GenerationResult]:
    """Every prompt decoded to its end in ``engine``'s continuous batch of ``max_batch`` rows
    (a row a sequence leaves takes the next prompt at once); results in ``prompts``' order,
    each what ``engine.generate`` gives that prompt alone (up to batched float rounding at a
    near-tie of two logits). For offline work such as the build's task score; the serving
    executor (``serving/executor.py``) runs a loop of the same shape with admission,
    deadlines, energy shares and cancellation."""
    for ids in prompts:
        engine.check_fits(len(ids), params.max_new_tokens)
    if not prompts:
        return []
    slots = slots_for(engine, min(max_batch, len(prompts)),
                      max(len(ids) for ids in prompts) + params.max_new_tokens)
    results: list[GenerationResult | None] = [None] * len(prompts)
    queue = iter(enumerate(prompts))
    eos = engine.eos_token_ids
    live: dict[int, _Sequence] = {}  # row -> its sequence

    def fill(row: int) -> None:
        """Prefill the next prompt into the free ``row`` (a prompt may end at once)."""
        for index, ids in queue:
            seq = _Sequence(index, OutputStream(engine.tokenizer, eos, params), Sampler(params),
                            ResultBuilder(len(ids), eos))
            done = seq.push(slots.prefill(row, ids, seq.sampler))
            if done is None:
                live[row] = seq
                return
            results[index] = done
            slots.release(row)

    for row in range(slots.max_batch):
        fill(row)
    while live:
        rows = sorted(live)
        tokens = slots.step(rows, [live[r].last for r in rows], [live[r].sampler for r in rows])
        for row, token in zip(rows, tokens, strict=True):
            done = live[row].push(token)
            if done is not None:
                results[live.pop(row).index] = done
                slots.release(row)
                fill(row)
    return [r for r in results if r is not None]
