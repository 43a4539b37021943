"""``greenroute bench spec --rows N``: the speculative rung against ``full`` with ``N`` rows in
one batch each, side by side.

Both serve the same ``N`` chat prompts (greedy, ``new_tokens`` each, EOS ignored) as one
continuous batch: ``full`` in its shared-KV slots (one forward a token for every row), the
speculative rung in its own slots (the draft steps every row together and ``full`` verifies
every row's drafts in one forward of its verify graph), and the same rung verifying each row's
drafts in a forward of its own (``speculative-alone``, as before the verify graph, and as it
runs without one). They take turns, round after round, each on the service's meter.
Reported: tok/s and joules per generated token of each, their ratios per round and median,
the acceptance rate, and whether every row's text is the same on both (both are ``full``'s
greedy output; a batched and a single-row forward can differ at a near-tie).
Issue 39's target: the rung at 8 rows ≤ 0.7× ``full``'s joules per token, identical text.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.spec import compared
from models.build.pipeline.speculative import QUESTIONS
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Sampler, Slots
from models.runtime.engine.speculative import SpecSlots
from models.runtime.ladder import load_ladder
from models.runtime.manifest import SPECULATIVE, Manifest
from telemetry.factory import MeterConfig, create_meter

ALONE = f"{SPECULATIVE}-alone"  # the rung verifying each row in a forward of its own


def _serve(slots: Slots, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Every prompt in a row of ``slots`` at once, stepped together until each has
    ``new_tokens`` (a speculative round's surplus past that is dropped, as the lane does)."""
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    samplers = [Sampler(params) for _ in prompts]
    out = [[slots.prefill(r, ids, samplers[r])] for r, ids in enumerate(prompts)]
    while True:
        rows = [r for r in range(len(prompts)) if len(out[r]) < new_tokens]
        if not rows:
            break
        made = slots.step_many(rows, [out[r][-1] for r in rows],
                               [samplers[r] for r in rows]).tokens
        for r, m in zip(rows, made, strict=True):
            out[r] += m
    for r in range(len(prompts)):
        slots.release(r)
    return [o[:new_tokens] for o in out]


def run_rows(ladder: Path, rows: int = 8, draft: str | None = None, k: int | None = None,
             new_tokens: int = 64, rounds: int = 3, threads: int = 2) -> dict[str, Any]:
    manifest = Manifest.load(ladder)
    spec_info = manifest.variants.get(SPECULATIVE)
    chosen = spec_info.speculative if spec_info else None
    draft = draft or (chosen.draft if chosen else "int8")
    k = k or (chosen.k if chosen else 5)
    loaded = load_ladder(ladder, threads=threads, runtime="onnxruntime", only=["full", draft],
                         warmup=False)
    full, drafter = loaded.engines["full"], loaded.engines[draft]
    assert isinstance(full, OrtEngine) and isinstance(drafter, OrtEngine)
    template = ChatTemplate.for_directory(ladder)
    questions = list(QUESTIONS)
    prompts = [full.encode(template.render([{"role": "user", "content": q}]))
               for q in (questions * (rows // len(questions) + 1))[:rows]]
    length = max(map(len, prompts)) + new_tokens + k + 2
    made: dict[str, Slots] = {
        "full": KVSlots(full, rows, length),
        SPECULATIVE: SpecSlots(full, drafter, k, rows, length),
        ALONE: SpecSlots(full, drafter, k, rows, length, batched_verify=False)}
    meter = create_meter(MeterConfig("auto", "cpu", None, None, 10.0, 0.1,
                                     Path("/sys/class/powercap"), 10.0, 0.0))
    for slots in made.values():  # warm-up
        _serve(slots, prompts[:2], 8)
    spec, alone = made[SPECULATIVE], made[ALONE]
    assert isinstance(spec, SpecSlots) and isinstance(alone, SpecSlots)
    spec.drafted = spec.accepted = 0
    rate: dict[str, list[float]] = {n: [] for n in made}
    jpt: dict[str, list[float]] = {n: [] for n in made}
    identical = total = 0
    for i in range(rounds):
        texts = {}
        for name in (list(made) if i % 2 == 0 else list(made)[::-1]):  # taking turns
            mark = meter.begin()
            t0 = time.perf_counter()
            texts[name] = _serve(made[name], prompts, new_tokens)
            seconds = time.perf_counter() - t0
            joules = meter.end(mark).joules
            rate[name].append(rows * new_tokens / seconds)
            jpt[name].append(joules / (rows * new_tokens))
        identical += sum(a == b for a, b in zip(texts["full"], texts[SPECULATIVE], strict=True))
        total += rows
    meter.close()
    return {"rows": rows, "draft": draft, "k": k, "new_tokens": new_tokens, "rounds": rounds,
            "threads": threads, "batched_verify": spec.target.verify_positions > 0,
            **compared(meter, spec, identical, total, rate, jpt),
            "alone_ratio_per_round": [a / f for a, f in zip(jpt[ALONE], jpt["full"],
                                                            strict=True)]}


def report_rows(f: dict[str, Any]) -> str:
    tps, jpt = f["tokens_per_s"], f["joules_per_token"]
    ratio = statistics.median(f["joules_ratio_per_round"])
    return "\n".join([
        f"speculative rung vs full, {f['rows']} rows in one batch each: draft {f['draft']}, "
        f"k {f['k']}; greedy, {f['new_tokens']} tokens, {f['rounds']} rounds taking turns, "
        f"{f['threads']} threads",
        f"{'engine':<24}{'tok/s':>9}{'J/token':>10}",
        *(f"{n:<24}{tps[n]:>9.1f}{jpt[n]:>10.4f}" for n in ("full", SPECULATIVE, ALONE)),
        "verify: " + ("one forward a round (verify graph)" if f["batched_verify"] else
                      "row by row (no verify graph: not built, or no kernels library)"),
        f"acceptance rate {f['acceptance_rate']:.3f}; identical outputs "
        f"{f['identical_outputs']}; energy source {f['energy_source']}"
        + (" (an estimate)" if f["energy_estimated"] else ""),
        f"joules/token {ratio:.2f}x full (per round "
        f"{[round(x, 2) for x in f['joules_ratio_per_round']]}; target <= 0.7): "
        f"{'met' if ratio <= 0.7 else 'MISSED'}; verifying row by row "
        f"{statistics.median(f['alone_ratio_per_round']):.2f}x full",
    ])
