"""The stages of a ladder build, in order, over one :class:`Build` that each stage extends:

1. :func:`export_fp32` — `full` (and `distilled`) exported, verified, evaluated and timed;
2. :func:`quantize_rungs` — every quantization candidate built, evaluated and raced; the
   8-bit pick becomes `int8` (`distilled-int8`), a 4-bit one `int4` when it earns the rung;
3. :func:`choose_runtime` — our loop against onnxruntime-genai on `full`;
4. :func:`score_tasks` — each variant answers the committed questions;
5. :func:`make_manifest` — everything measured, in the manifest.

The speculative stage (``speculative.choose_speculative``) runs on the written ladder.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.errors import BuildError
from models.build.pipeline import quantize as q
from models.build.pipeline.checkpoint import count_parameters
from models.build.pipeline.exactness import check_candidate
from models.build.pipeline.export import GENAI_BUILDER, ONNX_FILE, onnx_bytes
from models.build.pipeline.genai_config import adapt_builder_genai_config, write_genai_config
from models.build.pipeline.options import BuildOptions, Log
from models.build.pipeline.quality import QualityReport, agreement, evaluate
from models.build.pipeline.tasks import MAX_NEW_TOKENS as TASK_TOKENS
from models.build.pipeline.tasks import TaskReport, load_tasks, task_score
from models.build.pipeline.verify import export_verified
from models.runtime.calibrate import calibrate_many, measure_wide_many
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Engine
from models.runtime.engine.ort import OrtEngine
from models.runtime.host import cpu_name, cpuid_masked, isa_flags
from models.runtime.manifest import Calibration, Manifest, VariantInfo

# A race's speed is the geometric mean of a candidate's decode tokens/s with one row and with
# RACE_ROWS rows in every step: the rung serves one client and many, and an 8-bit kernel that
# is quick for one row can scale worse with rows than another (blocks 64 and 128 tied block 32
# at one row and ran 1.14x faster at 16).
RACE_ROWS = 16
EIGHT_BIT_RULE = ("of the 8-bit methods smaller than the source, the fastest within 0.02 "
                  "quality of the best (speed: geometric mean of decode tokens/s at 1 and "
                  f"{RACE_ROWS} rows; speeds within 5 % of the fastest tie, the best quality "
                  "wins)")
FOUR_BIT_RULE = ("4-bit methods >= 1.1x int8's speed (geometric mean of decode tokens/s at 1 "
                 f"and {RACE_ROWS} rows), smaller than int8, with quality above distilled earn "
                 "the rung; of those, the best quality (to 0.01), then the fastest")


@dataclass
class Build:
    """One build in progress: its inputs and what the stages have measured so far."""

    opts: BuildOptions
    out: Path  # the staging directory
    work: Path  # scratch inside it
    tokenizer: Tokenizer
    tokenizer_file: Path
    context: int
    eos: list[int]
    heldout: list[int]  # token ids of the held-out text
    prompt: list[int]  # the calibration prompt
    template: ChatTemplate  # the ladder's chat template (its files are in ``out``)
    log: Log
    sources: dict[str, tuple[str, Path]]  # variant → (role, checkpoint)
    exporters: dict[str, str] = field(default_factory=dict)
    reports: dict[str, QualityReport] = field(default_factory=dict)
    measured: dict[str, Calibration] = field(default_factory=dict)
    engines: dict[str, OrtEngine] = field(default_factory=dict)
    methods: dict[str, q.QuantMethod] = field(default_factory=dict)
    quant_choice: dict[str, Any] = field(default_factory=dict)
    runtime_choice: dict[str, Any] = field(default_factory=dict)
    task_reports: dict[str, TaskReport] = field(default_factory=dict)
    task_count: int = 0
    student_made: dict[str, Any] | None = None  # the student's training record, summarised
    # race outcomes recorded for this model and CPU class (pipeline/decisions.py), or None
    known: dict[str, Any] | None = None
    decided: dict[str, Any] = field(default_factory=dict)  # this build's race outcomes

    def engine_for(self, vdir: Path) -> OrtEngine:
        return OrtEngine(vdir / ONNX_FILE, self.tokenizer, self.context, self.eos,
                         threads=self.opts.threads)

    def measure(self, engines: Mapping[str, Engine]) -> dict[str, Calibration]:
        """Engines that will be compared are measured together, taking turns."""
        return calibrate_many(engines, self.prompt, new_tokens=self.opts.calibration_tokens,
                              repeats=self.opts.calibration_repeats, threads=self.opts.threads)

    def quality(self, name: str) -> float:
        return self.reports["full"].perplexity / self.reports[name].perplexity


def export_fp32(b: Build) -> None:
    """Stage 1: each source checkpoint exported to fp32, verified against PyTorch, evaluated on
    the held-out text, and timed (taking turns)."""
    for name, (_, ckpt) in b.sources.items():
        b.log(f"exporting {name} (fp32) from {ckpt}")
        b.exporters[name], b.engines[name] = export_verified(
            ckpt, b.out / name, b.engine_for, b.heldout, b.opts.opset, b.opts.genai_builder,
            b.log)
        b.reports[name] = evaluate(b.engines[name], b.heldout, b.opts.eval_window)
    b.log(f"  exporters: {b.exporters}")
    b.measured.update(b.measure(dict(b.engines)))
    for name in b.sources:
        b.log(f"  {name}: ppl {b.reports[name].perplexity:.2f}, "
              f"{b.measured[name].decode_tokens_per_s:.0f} tok/s")


def _genai_config(b: Build, vdir: Path, base: str) -> None:
    """``vdir``'s ``genai_config.json``, from its fp32 ``base``'s exporter: a builder graph's
    says its KV buffer is shared, so our engine runs it as the service does."""
    if b.exporters[base] == GENAI_BUILDER:
        adapt_builder_genai_config(vdir, b.out / base, ONNX_FILE, b.opts.threads)
    else:
        write_genai_config(vdir, ONNX_FILE, b.opts.threads)


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
        _genai_config(b, tdir, base)
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
               if trials[m.name]["speed"] >= 1.1 * speed
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
            b.quant_choice["int4"] = {
                "added": earns, "chosen": pick4.name if pick4 and earns else None,
                "rule": FOUR_BIT_RULE, "measured": trials[pick4.name] if pick4 else None,
                **({"recorded": b.known["recorded_in"]} if recorded and b.known else {})}
            if pick4 and earns:
                _adopt(b, "int4", "int8", pick4, "full", engines)
            if not recorded:
                b.decided.update(int8=pick.name, int4=pick4.name if pick4 and earns else None)


def choose_runtime(b: Build) -> None:
    """Stage 3: serve with onnxruntime-genai when it decodes `full` faster than our loop (the
    two measured taking turns); every variant gets its genai config either way."""
    for name, (role, _) in b.sources.items():
        _genai_config(b, b.out / name, "full" if role == "teacher" else "distilled")
    ours = b.engine_for(b.out / "full")
    result: dict[str, Any] = {}
    try:
        from models.runtime.engine.genai import GenaiEngine

        genai = GenaiEngine(b.out / "full", b.tokenizer, b.context, b.eos)
        costs = b.measure({"onnxruntime": ours, "onnxruntime-genai": genai})
        for name, cost in costs.items():
            result[name] = {"decode_tokens_per_s": cost.decode_tokens_per_s}
        faster = (costs["onnxruntime-genai"].decode_tokens_per_s
                  > 1.05 * costs["onnxruntime"].decode_tokens_per_s)
        result["chosen"] = "onnxruntime-genai" if faster else "onnxruntime"
    except Exception as err:  # genai absent or unable to run this graph: our loop serves
        result["onnxruntime"] = {
            "decode_tokens_per_s": b.measure({"o": ours})["o"].decode_tokens_per_s}
        result["onnxruntime-genai"] = {"error": str(err).splitlines()[0]}
        result["chosen"] = "onnxruntime"
    result["rule"] = "onnxruntime-genai if > 1.05x our loop's decode tokens/s on full"
    b.log(f"  runtime: {result['chosen']} ({json.dumps(result)})")
    b.runtime_choice = result


def score_tasks(b: Build) -> None:
    """Stage 4: each variant answers the committed questions through the chat template (on
    the engines loaded for evaluation: their files were copied, not changed)."""
    if b.opts.tasks is None:
        return
    tasks = load_tasks(b.opts.tasks)
    b.task_count = len(tasks)
    for name in b.sources:
        b.task_reports[name] = task_score(b.engines[name], b.template, tasks)
        b.log(f"  {name}: task score {b.task_reports[name].correct}/{len(tasks)}")


def make_manifest(b: Build, key: str, sources: dict[str, Any],
                  config: dict[str, Any]) -> Manifest:
    """Stage 5: the manifest of everything measured."""
    import onnxruntime

    ref = b.reports["full"]
    variants: dict[str, VariantInfo] = {}
    for name, (role, ckpt) in b.sources.items():
        chosen = b.methods.get(name)
        variants[name] = VariantInfo(
            name=name, dir=name, file=ONNX_FILE, source=role,
            parameters=count_parameters(ckpt), bytes=onnx_bytes(b.out / name),
            precision=chosen.precision if chosen else "fp32",
            quantization=chosen.name if chosen else None,
            exporter=b.exporters["full" if role == "teacher" else "distilled"],
            perplexity=b.reports[name].perplexity, quality=b.quality(name),
            top1_agreement=agreement(b.reports[name], ref),
            task_score=b.task_reports[name].score if name in b.task_reports else None,
            calibration=b.measured[name],
            made=b.student_made if role == "student" else None)
    tasks = None
    if b.opts.tasks is not None:
        tasks = {"file": b.opts.tasks.name, "count": b.task_count,
                 "max_new_tokens": TASK_TOKENS,
                 "rule": "greedy answer contains an expected answer as a whole word",
                 "answers": {n: list(r.answers) for n, r in b.task_reports.items()}}
    return Manifest(
        build_key=key, source=sources, build_config=config,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host={"machine": platform.machine(), "processor": cpu_name(), "isa": isa_flags(),
              "cpu_count": os.cpu_count(), "threads": b.opts.threads,
              "onnxruntime": onnxruntime.__version__,
              # built under kernels/avx2only: "isa" is what the build's code saw
              **({"cpuid_mask": "avx2"} if cpuid_masked() else {})},
        tokenizer=b.tokenizer_file.name, context_length=b.context, eos_token_ids=b.eos,
        runtime=b.runtime_choice["chosen"], runtime_choice=b.runtime_choice,
        quantization_choice=b.quant_choice,
        heldout={"file": b.opts.heldout.name, "tokens_evaluated": ref.tokens,
                 "window": b.opts.eval_window},
        tasks=tasks, chat_template=b.template.source,
        variants=variants)
