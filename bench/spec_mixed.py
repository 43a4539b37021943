"""``greenroute bench spec --rows N --riders M``: a mixed load, ``N`` speculative rows beside
``M`` rows of the draft rung's own, served the lane's way (a round of the speculative rung,
then a step of the draft rung, in turn) in two arrangements taking turns on the meter:

* ``apart``: the speculative rung's draft rows in a KV buffer of their own, so its draft steps
  and the draft rung's steps are separate forwards;
* ``riding``: the draft rows in the draft rung's own buffer (what the service does when both
  rungs are loaded: :func:`serving.batch.batches_for`), the draft rung's rows taking a token
  on each of the speculative rung's draft steps as well as on steps of their own.

Reported: tok/s and joules per generated token (both kinds of row together) of each, the
riding / apart ratio per round and median, the tokens the riders took, and whether every row's
text is the same in both (greedy; a batched and a narrower forward can differ at a near-tie).
Threads as the service runs them (the manifest's ``serve_threads``, wide session from 4 rows).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from models.build.pipeline.speculative import QUESTIONS
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Riders, RowPool, Sampler
from models.runtime.engine.speculative import SpecSlots
from models.runtime.ladder import load_ladder
from models.runtime.manifest import SPECULATIVE, Manifest
from telemetry.factory import MeterConfig, create_meter

ARRANGEMENTS = ("apart", "riding")


def _serve(spec: SpecSlots, own: KVSlots, pool: RowPool, prompts: list[list[int]], n_spec: int,
           new_tokens: int, ride: bool) -> tuple[list[list[int]], int]:
    """The first ``n_spec`` prompts on the speculative rung, the rest on the draft rung, until
    each has ``new_tokens``; the lane's turns. Returns the texts and the tokens riders took."""
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    samplers = [Sampler(params) for _ in prompts]
    rows: list[int] = []
    out: list[list[int]] = []
    for i, ids in enumerate(prompts):
        if i < n_spec:
            rows.append(i)
            out.append([spec.prefill(i, ids, samplers[i])])
        else:
            rows.append(pool.take())
            out.append([own.prefill(rows[i], ids, samplers[i])])
    rode = 0
    while True:
        left = [i for i in range(len(prompts)) if len(out[i]) < new_tokens]
        if not left:
            break
        mine = [i for i in left if i < n_spec]
        theirs = [i for i in left if i >= n_spec]
        riders = Riders([rows[i] for i in theirs], [out[i][-1] for i in theirs],
                        [samplers[i] for i in theirs],
                        [new_tokens - len(out[i]) for i in theirs]) if ride and theirs else None
        if mine:
            result = spec.step_many([rows[i] for i in mine], [out[i][-1] for i in mine],
                                    [samplers[i] for i in mine], riders)
            for i, made in zip(mine, result.tokens, strict=True):
                out[i] += made
            for i, made in zip(theirs if riders else [], result.riders, strict=True):
                out[i] += made
                rode += len(made)
        theirs = [i for i in theirs if len(out[i]) < new_tokens]
        if theirs:  # the draft rung's own turn
            made = own.step([rows[i] for i in theirs], [out[i][-1] for i in theirs],
                            [samplers[i] for i in theirs])
            for i, t in zip(theirs, made, strict=True):
                out[i].append(t)
    for i in range(len(prompts)):
        if i < n_spec:
            spec.release(rows[i])
        else:
            own.release(rows[i])
            pool.give(rows[i])
    return [o[:new_tokens] for o in out], rode


def run_mixed(ladder: Path, rows: int = 8, riders: int = 8, draft: str | None = None,
              k: int | None = None, new_tokens: int = 64, rounds: int = 3,
              threads: int = 2) -> dict[str, Any]:
    manifest = Manifest.load(ladder)
    variant_threads = dict(manifest.serve_threads())
    spec_info = manifest.variants.get(SPECULATIVE)
    chosen = spec_info.speculative if spec_info else None
    draft = draft or (chosen.draft if chosen else "int8")
    k = k or (chosen.k if chosen else 5)
    loaded = load_ladder(ladder, threads=threads, runtime="onnxruntime", only=["full", draft],
                         warmup=False, variant_threads=variant_threads, wide_from_rows=4)
    full, drafter = loaded.engines["full"], loaded.engines[draft]
    assert isinstance(full, OrtEngine) and isinstance(drafter, OrtEngine)
    template = ChatTemplate.for_directory(ladder)
    questions = list(QUESTIONS)
    total = rows + riders
    prompts = [full.encode(template.render([{"role": "user", "content": q}]))
               for q in (questions * (total // len(questions) + 1))[:total]]
    length = max(map(len, prompts)) + new_tokens + k + 2
    # apart: the draft rows' own buffer; riding: one buffer and pool for both kinds of row
    own_apart, pool_apart = KVSlots(drafter, riders, length), RowPool(riders)
    shared, pool = KVSlots(drafter, total, length + k + 1), RowPool(total)
    made = {"apart": (SpecSlots(full, drafter, k, rows, length), own_apart, pool_apart),
            "riding": (SpecSlots(full, drafter, k, rows, length, draft_slots=shared,
                                 draft_rows=pool), shared, pool)}
    meter = create_meter(MeterConfig("auto", "cpu", None, None, 10.0, 0.1,
                                     Path("/sys/class/powercap"), 10.0, 0.0))
    for name in ARRANGEMENTS:  # warm-up
        _serve(*made[name], prompts[:2] + prompts[rows : rows + 2], 2, 8, name == "riding")
    rate: dict[str, list[float]] = {n: [] for n in ARRANGEMENTS}
    jpt: dict[str, list[float]] = {n: [] for n in ARRANGEMENTS}
    identical = rode = 0
    for i in range(rounds):
        texts = {}
        for name in (ARRANGEMENTS if i % 2 == 0 else ARRANGEMENTS[::-1]):  # taking turns
            mark = meter.begin()
            t0 = time.perf_counter()
            texts[name], took = _serve(*made[name], prompts, rows, new_tokens, name == "riding")
            seconds = time.perf_counter() - t0
            joules = meter.end(mark).joules
            rate[name].append(total * new_tokens / seconds)
            jpt[name].append(joules / (total * new_tokens))
            rode += took
        identical += sum(a == b for a, b in zip(texts["apart"], texts["riding"], strict=True))
    meter.close()
    return {"rows": rows, "riders": riders, "draft": draft, "k": k, "new_tokens": new_tokens,
            "rounds": rounds, "threads": {n: variant_threads.get(n, threads)
                                          for n in ("full", draft)},
            "energy_source": meter.source, "energy_estimated": meter.estimated,
            "identical_outputs": f"{identical}/{total * rounds}",
            "rider_tokens_per_round": rode / rounds,
            "tokens_per_s": {n: statistics.median(v) for n, v in rate.items()},
            "joules_per_token": {n: statistics.median(v) for n, v in jpt.items()},
            "joules_ratio_per_round": [r / a for r, a in zip(jpt["riding"], jpt["apart"],
                                                             strict=True)]}


def report_mixed(f: dict[str, Any]) -> str:
    tps, jpt = f["tokens_per_s"], f["joules_per_token"]
    ratio = statistics.median(f["joules_ratio_per_round"])
    return "\n".join([
        f"mixed load: {f['rows']} speculative rows (draft {f['draft']}, k {f['k']}) beside "
        f"{f['riders']} rows of {f['draft']}; greedy, {f['new_tokens']} tokens each, "
        f"{f['rounds']} rounds taking turns; threads {f['threads']}",
        f"{'arrangement':<16}{'tok/s':>9}{'J/token':>10}",
        *(f"{n:<16}{tps[n]:>9.1f}{jpt[n]:>10.4f}" for n in ARRANGEMENTS),
        f"riders took {f['rider_tokens_per_round']:.0f} tokens a round on draft steps; "
        f"identical outputs {f['identical_outputs']}; energy source {f['energy_source']}"
        + (" (an estimate)" if f["energy_estimated"] else ""),
        f"riding / apart joules per token {ratio:.2f}x (per round "
        f"{[round(x, 2) for x in f['joules_ratio_per_round']]})",
    ])
