"""The stages of a ladder build, in order, over one :class:`Build` that each stage extends:

1. :func:`export_fp32` — `full` (and `distilled`) exported, verified, evaluated and timed;
2. :func:`models.build.pipeline.race.quantize_rungs` — every quantization candidate built,
   evaluated and raced (or the picks recorded for this model and CPU class); the 8-bit pick
   becomes `int8` (`distilled-int8`), a 4-bit one `int4` when it earns the rung;
3. :func:`choose_runtime` — our loop against onnxruntime-genai on `full`;
4. :func:`score_tasks` — each variant answers the committed questions;
5. :func:`make_manifest` — everything measured, in the manifest.

The speculative stage (``speculative.choose_speculative``) runs on the written ladder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.pipeline import quantize as q
from models.build.pipeline.checkpoint import count_parameters
from models.build.pipeline.export import GENAI_BUILDER, ONNX_FILE, onnx_bytes
from models.build.pipeline.genai_config import adapt_builder_genai_config, write_genai_config
from models.build.pipeline.options import BuildOptions, Log
from models.build.pipeline.quality import QualityReport, agreement, evaluate
from models.build.pipeline.tasks import MAX_NEW_TOKENS as TASK_TOKENS
from models.build.pipeline.tasks import TaskReport, load_tasks, task_score
from models.build.pipeline.verify import export_verified
from models.runtime.calibrate import calibrate_many
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Engine
from models.runtime.engine.ort import OrtEngine
from models.runtime.host import cpu_name, cpuid_masked, isa_flags
from models.runtime.manifest import Calibration, Manifest, VariantInfo


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


def genai_config(b: Build, vdir: Path, base: str) -> None:
    """``vdir``'s ``genai_config.json``, from its fp32 ``base``'s exporter: a builder graph's
    says its KV buffer is shared, so our engine runs it as the service does."""
    if b.exporters[base] == GENAI_BUILDER:
        adapt_builder_genai_config(vdir, b.out / base, ONNX_FILE, b.opts.threads)
    else:
        write_genai_config(vdir, ONNX_FILE, b.opts.threads)


def choose_runtime(b: Build) -> None:
    """Stage 3: serve with onnxruntime-genai when it decodes `full` faster than our loop (the
    two measured taking turns); every variant gets its genai config either way."""
    for name, (role, _) in b.sources.items():
        genai_config(b, b.out / name, "full" if role == "teacher" else "distilled")
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
