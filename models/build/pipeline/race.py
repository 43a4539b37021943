"""Build stage 2: the quantized rungs, each chosen by a race of candidate methods built,
checked for exactness, evaluated and timed taking turns (or built from the picks recorded for
this model and CPU class, :mod:`models.build.pipeline.decisions`). The manifest keeps every
figure."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from typing import Any

from models.build.errors import BuildError
from models.build.pipeline import quantize as q
from models.build.pipeline.decisions import near
from models.build.pipeline.exactness import check_candidate
from models.build.pipeline.export import ONNX_FILE, onnx_bytes
from models.build.pipeline.quality import evaluate
from models.build.pipeline.stages import Build, genai_config
from models.runtime.calibrate import measure_wide_many
from models.runtime.engine.ort import OrtEngine

# A race's speed is the geometric mean of a candidate's decode tokens/s with one row and with
# RACE_ROWS rows in every step: the rung serves one client and many, and an 8-bit kernel that
# is quick for one row can scale worse with rows than another (blocks 64 and 128 tied block 32
# at one row and ran 1.14x faster at 16).
RACE_ROWS = 16
EIGHT_BIT_RULE = ("of the 8-bit methods smaller than the source, the fastest within 0.02 "
                  "quality of the best (speed: geometric mean of decode tokens/s at 1 and "
                  f"{RACE_ROWS} rows; speeds within 5 % of the fastest tie, the best quality "
                  "wins)")
FOUR_BIT_SPEEDUP = 1.1
FOUR_BIT_RULE = ("4-bit methods >= 1.1x int8's speed (geometric mean of decode tokens/s at 1 "
                 f"and {RACE_ROWS} rows), smaller than int8, with quality above distilled earn "
                 "the rung; of those, the best quality (to 0.01), then the fastest")


def _race(b: Build, base: str, qname: str,
          candidates: list[q.QuantMethod]) -> tuple[dict[str, Any], dict[str, OrtEngine]]:
    """Every candidate built from ``base``, evaluated, then timed taking turns."""
    engines: dict[str, OrtEngine] = {}
    trials: dict[str, Any] = {}
    prompts = _check_prompts(b)
    for i, method in enumerate(candidates, 1):
        b.log(f"  {qname} candidate {i}/{len(candidates)} {method.name}: quantizing, checking "
              "against exact references, measuring its quality")
        tdir = b.work / f"{qname}-{method.name}"
        q.quantize(b.out / base, tdir, method)
        # timed on the service's path: without its config a builder graph's copy would run
        # the loop for graphs without a shared KV buffer, and could not batch
        genai_config(b, tdir, base)
        engine = b.engine_for(tdir)
        check = check_candidate(tdir / ONNX_FILE, engine, b.engines[base], prompts)
        if not check["ok"]:  # wrong on this CPU: never timed, never picked
            trials[method.name] = {"bits": method.bits, "rejected": check["reason"],
                                   "check": check}
            b.log(f"  {qname} candidate {method.name}: rejected, {check['reason']}")
            continue
        engines[method.name] = engine
        trials[method.name] = {"check": check}
        b.reports[f"{qname}:{method.name}"] = evaluate(engine, b.heldout, b.opts.eval_window)
    if not engines:
        raise BuildError(f"no {qname} candidate computes correctly on this CPU: "
                         + "; ".join(f"{n}: {t['rejected']}" for n, t in trials.items()))
    b.log(f"  {qname}: timing {len(engines)} candidates at 1 row, then {RACE_ROWS} rows, "
          "taking turns")
    costs = b.measure(engines)
    wide = (measure_wide_many(engines, b.prompt, rows=RACE_ROWS) if len(engines) > 1
            else {})
    for method in candidates:
        if method.name not in engines:
            continue
        key = f"{qname}:{method.name}"
        rep, cost = b.reports[key], costs[method.name]
        loaded = wide.get(method.name)
        trials[method.name] = {
            **trials[method.name], "bits": method.bits, "perplexity": rep.perplexity,
            "quality": b.quality(key),
            "decode_tokens_per_s": cost.decode_tokens_per_s,
            f"tokens_per_s_{RACE_ROWS}_rows": loaded,
            "speed": (math.sqrt(cost.decode_tokens_per_s * loaded) if loaded
                      else cost.decode_tokens_per_s),
            "bytes": onnx_bytes(b.work / f"{qname}-{method.name}")}
        b.measured[key] = cost
        b.log(f"  {qname} candidate {method.name}: ppl {rep.perplexity:.2f}, "
              f"{cost.decode_tokens_per_s:.0f} tok/s"
              + (f", {loaded:.0f} at {RACE_ROWS} rows" if loaded else ""))
    return trials, engines


def _check_prompts(b: Build) -> list[list[int]]:
    """A few prompts for :func:`check_candidate`: the calibration prompt and two held-out
    windows (real text, so the activations have their real outliers)."""
    n = 48
    return [list(b.prompt), b.heldout[:n], b.heldout[len(b.heldout) // 2:][:n]]


def pick_8bit(trials: dict[str, Any], candidates: list[q.QuantMethod],
              base_bytes: int) -> q.QuantMethod:
    """The rule of :data:`EIGHT_BIT_RULE`. A copy no smaller than its source is no quantized
    rung: blocks wider than a small model's matrices pad every row (a 32-wide tiny model at
    block 128 grew 1.4x)."""
    all_eight = [m for m in candidates if m.bits == 8 and "rejected" not in trials[m.name]]
    if not all_eight:
        raise BuildError("every 8-bit candidate failed the exactness check on this CPU: "
                         + "; ".join(f"{m.name}: {trials[m.name].get('rejected')}"
                                     for m in candidates if m.bits == 8))
    eight = [m for m in all_eight if trials[m.name]["bytes"] < base_bytes] or all_eight
    best_q = max(trials[m.name]["quality"] for m in eight)
    ok = [m for m in eight if trials[m.name]["quality"] >= best_q - 0.02]
    top = max(trials[m.name]["speed"] for m in ok)
    return max((m for m in ok if trials[m.name]["speed"] >= 0.95 * top),
               key=lambda m: trials[m.name]["quality"])


def pick_4bit(trials: dict[str, Any], candidates: list[q.QuantMethod], int8: q.QuantMethod,
              floor: float) -> tuple[q.QuantMethod | None, bool]:
    """The rule of :data:`FOUR_BIT_RULE`: a 4-bit rung earns its place only if no other rung
    dominates it (clearly faster than int8, better than the student's quality ``floor``).
    Returns the pick and whether it earns the rung."""
    fours = [m for m in candidates if m.bits == 4 and "rejected" not in trials[m.name]]
    speed = trials[int8.name]["speed"]
    earning = [m for m in fours
               if trials[m.name]["speed"] >= FOUR_BIT_SPEEDUP * speed
               and trials[m.name]["quality"] > floor
               and trials[m.name]["bytes"] < trials[int8.name]["bytes"]]
    if not fours:  # every 4-bit candidate rejected by the exactness check
        return None, False
    pick = max(earning or fours, key=lambda m: (round(trials[m.name]["quality"], 2),
                                                trials[m.name]["speed"]))
    return pick, bool(earning)


def _adopt(b: Build, name: str, race: str, method: q.QuantMethod, base: str,
           engines: Mapping[str, OrtEngine]) -> None:
    """Make the raced candidate ``method`` the rung ``name``."""
    shutil.rmtree(b.out / name, ignore_errors=True)
    shutil.copytree(b.work / f"{race}-{method.name}", b.out / name)
    b.reports[name] = b.reports[f"{race}:{method.name}"]
    b.measured[name] = b.measured[f"{race}:{method.name}"]
    b.engines[name] = engines[method.name]
    b.sources[name] = b.sources[base]
    b.methods[name] = method


def _recorded_candidates(b: Build, candidates: list[q.QuantMethod]) -> list[q.QuantMethod]:
    """Only the recorded picks, where this model and CPU class have them (else all)."""
    if b.known is None or b.opts.race or "int8" not in b.known:
        return candidates
    wanted = {b.known["int8"], *([b.known["int4"]] if b.known.get("int4") else [])}
    listed = [m for m in candidates if m.name in wanted]
    if len(listed) != len(wanted):  # a candidate list that changed: race
        return candidates
    b.log(f"  int8: the decision recorded for this model on {b.known['cpu']} "
          f"({b.known['recorded_in']}): {', '.join(sorted(wanted))}; `--race` races again")
    return listed


def quantize_rungs(b: Build) -> None:
    """Stage 2: the quantized rungs, each chosen by a race (the manifest keeps every figure),
    or built from the decision recorded for this model and CPU class."""
    for base, qname in (("full", "int8"), ("distilled", "distilled-int8")):
        if base not in b.sources:
            continue
        four = base == "full" and b.opts.consider_int4
        candidates = [*q.candidates_8bit(), *(q.CANDIDATES_4BIT if four else ())]
        recorded = False
        if base == "full":
            listed = _recorded_candidates(b, candidates)
            recorded, candidates = listed is not candidates, listed
        if base == "distilled" and "int8" in b.methods:
            # the student has the teacher's matrix shapes, so the kernels rank the same way:
            # its copy takes the method int8's race chose (racing again cost 87 s of a build
            # and picked the same block size)
            candidates = [b.methods["int8"]]
        trials, engines = _race(b, base, qname, candidates)
        base_bytes = onnx_bytes(b.out / base)
        if recorded and "rejected" in trials[b.known["int8"]]:  # type: ignore[index]
            b.log("  int8: the recorded pick fails its check here: racing every candidate")
            recorded, candidates = False, [*q.candidates_8bit(),
                                           *(q.CANDIDATES_4BIT if four else ())]
            trials, engines = _race(b, base, qname, candidates)
        if len(candidates) == 1 and trials[candidates[0].name].get("bytes",
                                                                   base_bytes) >= base_bytes:
            # int8's method does not shrink the student (a tiny model's fixed overheads can
            # outweigh its weights), or fails the exactness check on it: race every 8-bit
            # method for it after all
            candidates = list(q.candidates_8bit())
            trials, engines = _race(b, base, qname, candidates)
        pick = pick_8bit(trials, candidates, base_bytes)
        b.quant_choice[qname] = {"chosen": pick.name, "rule": EIGHT_BIT_RULE,
                                 "source_bytes": base_bytes, "candidates": trials,
                                 **({"recorded": b.known["recorded_in"]}  # type: ignore[index]
                                    if recorded else {})}
        _adopt(b, qname, qname, pick, base, engines)
        if four:
            floor = b.quality("distilled") if "distilled" in b.reports else 0.0
            pick4, earns = pick_4bit(trials, candidates, pick, floor)
            if recorded:  # the recorded outcome stands (the speeds above are one run's)
                assert b.known is not None
                earns = pick4 is not None and pick4.name == b.known.get("int4")
            elif pick4 is not None and _near(_margin(trials, pick4, pick)):
                # inside the race's noise of the threshold: measured again before it is kept
                # or dropped, each speed the mean of both runs (int8's pick, made on the race's
                # speeds, stands: its first run stays in ``remeasured``)
                _remeasure(b, {n: engines[n] for n in (pick.name, pick4.name)}, trials)
                pick4, earns = pick_4bit(trials, candidates, pick, floor)
            b.quant_choice["int4"] = {
                "added": earns, "chosen": pick4.name if pick4 and earns else None,
                "rule": FOUR_BIT_RULE, "measured": trials[pick4.name] if pick4 else None,
                "margin": round(_margin(trials, pick4, pick), 3) if pick4 else None,
                **({"recorded": b.known["recorded_in"]} if recorded and b.known else {})}
            if pick4 and earns:
                _adopt(b, "int4", "int8", pick4, "full", engines)
            if not recorded:
                b.decided.update(int8=pick.name, int4=pick4.name if pick4 and earns else None)


def _margin(trials: dict[str, Any], four: q.QuantMethod, eight: q.QuantMethod) -> float:
    """The 4-bit pick's speed over int8's, as a share of the threshold (1.0: on it)."""
    return trials[four.name]["speed"] / trials[eight.name]["speed"] / FOUR_BIT_SPEEDUP


def _near(margin: float) -> bool:
    return near(margin, 1.0)


def _remeasure(b: Build, engines: Mapping[str, OrtEngine], trials: dict[str, Any]) -> None:
    """Time ``engines`` again, taking turns, at 1 and :data:`RACE_ROWS` rows; each one's speed
    becomes the mean of its two runs (both kept in ``remeasured``)."""
    costs = b.measure(engines)
    wide = measure_wide_many(engines, b.prompt, rows=RACE_ROWS)
    for name in engines:
        loaded = wide.get(name)
        again = (math.sqrt(costs[name].decode_tokens_per_s * loaded) if loaded
                 else costs[name].decode_tokens_per_s)
        first = trials[name]["speed"]
        trials[name]["remeasured"] = [first, again]
        trials[name]["speed"] = (first + again) / 2
        b.log(f"  {name}: near the threshold, measured again: {first:.1f} then {again:.1f}")
