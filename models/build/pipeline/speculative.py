"""Build stage: choose the speculative rung's draft and k by measurement (or leave it out).

Every shared-KV rung of the ladder is tried as the draft at increasing k (until the speed-up
falls: it rises with k while the longer draft pays, then only falls), each combination taking
turns with ``full`` itself on the same chat prompts (greedy, ``new_tokens`` each): decode
tokens/s and joules per token of both (the service's meter: RAPL or NVML where readable, else
its labelled estimate), and the share of drafted tokens ``full`` kept. The rung is earned by
the combination with the fewest joules per token when it costs at most ``MAX_ENERGY_RATIO``
of ``full``'s, or by the fastest when it beats ``full``'s speed by ``MIN_SPEEDUP`` (a one-core
draft can save energy at ``full``'s speed); the manifest records every measurement either way.
Runs at the end of a build, and on its own for a ladder built before this stage existed or
under another rule (the build key does not change: nothing else is rebuilt).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.pipeline.decisions import near
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.session import share_pool_if_uniform
from models.runtime.engine.speculative import SpeculativeEngine, rung_threads
from models.runtime.manifest import SPECULATIVE, Calibration, Manifest, SpeculativeInfo
from telemetry.factory import MeterConfig, create_meter

KS = (3, 5, 8)
NONE = "none"  # a recorded outcome: no speculative rung
MIN_SPEEDUP = 1.05  # decode tokens/s over full's that earns the rung
MAX_ENERGY_RATIO = 0.9  # or joules per token under full's
RULE = (f"fewest joules/token draft x k if <= {MAX_ENERGY_RATIO}x full's, else fastest if >= "
        f"{MIN_SPEEDUP}x full's greedy decode tokens/s (taking turns on the same prompts)")
QUESTIONS = ("Why is the sky blue?", "Write a Python function that reverses a string.",
             "Explain what a hash table is in two sentences.")


def choose_speculative(ladder: Path, manifest: Manifest, threads: int, new_tokens: int = 48,
                       log: Callable[[str], None] = print,
                       recorded: str | None = None) -> dict[str, Any]:
    """Measure every draft x k in a fresh process whose sessions share one thread pool, as
    the serving process's do (this one's sessions have their own pools, and two pools taking
    turns on the same cores make any speculative pair look slow); add the rung to
    ``manifest`` when one earns it; return the record (``manifest.speculative_choice``).

    ``recorded``: the outcome recorded for this model and CPU class (``draft:kK``, or
    :data:`NONE` for no rung; :mod:`pipeline.decisions`): only that candidate is measured (for
    the rung's figures) and it stands."""
    if recorded == NONE:
        return {"rule": RULE, "chosen": None, "recorded": True, "candidates": {},
                "why": "no draft x k earned the rung when this model raced on this CPU class"}
    with tempfile.TemporaryDirectory() as tmp:
        # the manifest goes by file: a fresh build saves its own only after this stage
        given, out = Path(tmp) / "manifest.json", Path(tmp) / "choice.json"
        given.write_text(manifest.model_dump_json())
        proc = subprocess.run(
            [sys.executable, "-m", "models.build.pipeline.speculative", str(ladder), str(given),
             str(threads), str(new_tokens), str(out), recorded or ""], capture_output=True,
            text=True,
            check=False)
        for line in proc.stdout.splitlines():
            log(line)
        if proc.returncode != 0 or not out.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"chosen": None, "why": f"measurement failed: {err}"}
        measured = Manifest.model_validate_json(out.read_text())
    record = measured.speculative_choice or {}
    if SPECULATIVE in measured.variants:
        manifest.variants[SPECULATIVE] = measured.variants[SPECULATIVE]
    return record


def _measure_and_choose(ladder: Path, manifest: Manifest, threads: int, new_tokens: int,
                        log: Callable[[str], None], only: str = "") -> dict[str, Any]:
    """Every draft x k against full (or ``only`` that one), taking turns; the rung added to
    ``manifest`` if earned (``only``: it stands)."""
    tokenizer = Tokenizer.from_file(str(ladder / manifest.tokenizer))
    template = ChatTemplate.for_directory(ladder)

    own = manifest.serve_threads()  # each model on the threads the service gives it

    def load(name: str) -> OrtEngine:
        info = manifest.variants[name]
        return OrtEngine(ladder / info.dir / info.file, tokenizer, manifest.context_length,
                         manifest.eos_token_ids, threads=own.get(name, threads))

    full = load("full")
    record: dict[str, Any] = {"rule": RULE, "new_tokens": new_tokens, "candidates": {}}
    if not full.shared_kv:
        record["chosen"] = None
        record["why"] = "full's graph has no shared KV buffer (not a GroupQueryAttention graph)"
        return record
    prompts = [full.encode(template.render([{"role": "user", "content": q}]))
               for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    full.generate(prompts[0], params)  # warm-up
    meter = create_meter(MeterConfig())
    record["energy_source"] = meter.source + (" (an estimate)" if meter.estimated else "")

    def timed(engine: Engine, ids: list[int]) -> tuple[list[int], float, float]:
        mark = meter.begin()
        got = engine.generate(ids, params).token_ids
        reading = meter.end(mark)
        return got, reading.seconds, reading.joules

    def measure(draft: OrtEngine, name: str, k: int) -> dict[str, Any]:
        """The rung with ``draft`` at ``k`` against full, taking turns on every prompt."""
        spec = SpeculativeEngine(full, draft, k)
        spec.generate(prompts[0], GenerationParams(max_new_tokens=8))  # warm-up
        spec.drafted = spec.accepted = 0
        ratios, energy, spec_s, identical = [], [], [], 0
        for ids in prompts:
            want, t_full, j_full = timed(full, ids)
            got, t_spec, j_spec = timed(spec, ids)
            ratios.append(t_full / t_spec)
            energy.append(j_spec / j_full if j_full > 0 else math.inf)
            spec_s.append(t_spec)
            identical += got == want
        acceptance = spec.accepted / max(1, spec.drafted)
        speedup, energy_ratio = statistics.median(ratios), statistics.median(energy)
        log(f"  speculative {name} k={k}: acceptance {acceptance:.2f}, "
            f"{speedup:.2f}x full's speed, {energy_ratio:.2f}x its J/token, "
            f"identical {identical}/{len(prompts)}")
        return {"draft": name, "k": k, "acceptance_rate": round(acceptance, 4),
                "speedup": round(speedup, 3), "energy_ratio": round(energy_ratio, 3),
                "identical_outputs": f"{identical}/{len(prompts)}",
                "decode_ms_per_token": round(1000 * statistics.median(spec_s) / new_tokens, 2)}

    drafts = [n for n, v in manifest.variants.items() if n != "full" and v.speculative is None]
    if only:
        drafts = [d for d in drafts if d == only.split(":k")[0]]
    loaded: dict[str, OrtEngine] = {}
    for name in drafts:
        draft = loaded[name] = load(name)
        if not draft.shared_kv:
            continue
        previous = (0.0, math.inf)
        for k in ([int(only.split(":k")[1])] if only else KS):
            c = record["candidates"][f"{name}:k{k}"] = measure(draft, name, k)
            if c["speedup"] < previous[0] and c["energy_ratio"] > previous[1]:
                break  # past this draft's best k: longer drafts only waste more
            previous = (c["speedup"], c["energy_ratio"])
    if not only and (near := _deciding(record["candidates"])) is not None:
        # inside the measurement's noise of its rule's threshold: measured again before it
        # is kept or dropped; its figures become the means of both runs
        first = record["candidates"][near]
        again = measure(loaded[first["draft"]], first["draft"], first["k"])
        record["candidates"][near] = {**first, **{
            f: round((first[f] + again[f]) / 2, 3)
            for f in ("speedup", "energy_ratio", "acceptance_rate", "decode_ms_per_token")},
            "remeasured": [{f: r[f] for f in ("speedup", "energy_ratio")}
                           for r in (first, again)]}
    meter.close()
    if only and only in record["candidates"]:
        _adopt(manifest, only, record["candidates"], threads)
        return {**record, "chosen": only, "recorded": True,
                "why": "recorded when this model raced on this CPU class"}
    return _choose(record, manifest, threads)


def _leaders(found: dict[str, Any]) -> tuple[str, str]:
    """(the candidate with the fewest joules per token, the fastest): the two :data:`RULE`
    looks at."""
    cheapest = min(found, key=lambda c: (found[c]["energy_ratio"], -found[c]["speedup"]))
    return cheapest, max(found, key=lambda c: found[c]["speedup"])


def _deciding(found: dict[str, Any]) -> str | None:
    """The candidate whose figure decides :data:`RULE` (the cheapest, else the fastest) when
    it lies within the measurement's noise of its threshold, else None."""
    if not found:
        return None
    cheapest, fastest = _leaders(found)
    if near(found[cheapest]["energy_ratio"], MAX_ENERGY_RATIO):
        return cheapest
    if (found[cheapest]["energy_ratio"] > MAX_ENERGY_RATIO
            and near(found[fastest]["speedup"], MIN_SPEEDUP)):
        return fastest
    return None


def _adopt(manifest: Manifest, pick: str, found: dict[str, Any], threads: int) -> None:
    """The measured candidate ``pick`` becomes the rung."""
    c = found[pick]
    add_rung(manifest, c["draft"], c["k"], c["acceptance_rate"], c["speedup"],
             c["decode_ms_per_token"] / 1000, threads, found)


def _choose(record: dict[str, Any], manifest: Manifest, threads: int) -> dict[str, Any]:
    """The rung by :data:`RULE` from the measured candidates (added to ``manifest``), with the
    deciding figures' margins over their thresholds (> 1: the rung's side)."""
    found = record["candidates"]
    if not found:
        return {**record, "chosen": None, "why": "no shared-KV draft"}
    cheapest, fastest = _leaders(found)
    record = {**record, "margin": {
        "energy": round(MAX_ENERGY_RATIO / found[cheapest]["energy_ratio"], 3),
        "speed": round(found[fastest]["speedup"] / MIN_SPEEDUP, 3)}}
    if found[cheapest]["energy_ratio"] <= MAX_ENERGY_RATIO:
        pick, why = cheapest, "fewest joules per token, under full's by the margin"
    elif found[fastest]["speedup"] >= MIN_SPEEDUP:
        pick, why = fastest, "faster than full by the margin"
    else:
        return {**record, "chosen": None,
                "why": "no draft x k beat full's energy or speed by the margin"}
    _adopt(manifest, pick, found, threads)
    return {**record, "chosen": pick, "why": why}


def add_rung(manifest: Manifest, draft: str, k: int, acceptance: float, speedup: float,
             seconds_per_token: float, threads: int, candidates: dict[str, Any]) -> None:
    """``full-speculative`` into ``manifest``: ``full``'s weights and quality, ``draft``
    proposing ``k`` tokens a round, with the costs the race measured."""
    full_info, draft_info = manifest.variants["full"], manifest.variants[draft]
    cal, draft_cal = full_info.calibration, draft_info.calibration
    manifest.variants[SPECULATIVE] = full_info.model_copy(update={
        "name": SPECULATIVE, "parameters": full_info.parameters + draft_info.parameters,
        "bytes": full_info.bytes + draft_info.bytes,
        "quantization": f"speculative: {draft} drafts {k}, full verifies",
        "calibration": Calibration(
            # a request's prompt goes through both models
            prefill_ms_per_token=((cal.prefill_ms_per_token if cal else 0.0)
                                  + (draft_cal.prefill_ms_per_token if draft_cal else 0.0)),
            decode_ms_per_token=1000 * seconds_per_token,
            decode_tokens_per_s=1 / seconds_per_token,
            threads=rung_threads(full_info.serve_threads or threads,
                                 draft_info.serve_threads or threads)),
        "speculative": SpeculativeInfo(
            target="full", draft=draft, k=k, acceptance_rate=round(acceptance, 4),
            speedup=round(speedup, 3), candidates=candidates)})


def main(argv: list[str]) -> int:
    """``python -m models.build.pipeline.speculative LADDER MANIFEST THREADS NEW_TOKENS OUT``:
    measure the variants of LADDER that the MANIFEST file lists, each on the threads the service
    gives it by default (one shared pool when those are all THREADS), and write the manifest
    (with the choice) to OUT."""
    ladder, given, out = Path(argv[0]), Path(argv[1]), Path(argv[4])
    threads, new_tokens = int(argv[2]), int(argv[3])
    only = argv[5] if len(argv) > 5 else ""
    manifest = Manifest.model_validate_json(given.read_text())
    share_pool_if_uniform(threads, manifest.serve_threads().values())
    manifest.speculative_choice = _measure_and_choose(ladder, manifest, threads, new_tokens,
                                                      lambda m: print(m, flush=True), only)
    out.write_text(manifest.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
