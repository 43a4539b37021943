"""Build a ladder: the orchestration of :mod:`models.build.pipeline.stages` (export, quantize by
measurement, evaluate, calibrate, manifest), built beside its final place and renamed into it.

An unchanged ladder (same source checkpoints, same build config) is not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.errors import BuildError
from models.build.pipeline import decisions, race, stages
from models.build.pipeline.checkpoint import eos_ids, same_vocab, save_tokenizer
from models.build.pipeline.export import exporters_for, onnx_bytes
from models.build.pipeline.genai_config import normalized
from models.build.pipeline.options import (
    DEFAULT_HELDOUT,
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    BuildOptions,
    Log,
)
from models.build.pipeline.progress import Progress
from models.build.pipeline.quality import heldout_ids
from models.build.pipeline.source import checkpoint_hash, resolve_checkpoint
from models.build.pipeline.speculative import NONE as SPECULATIVE_NONE
from models.build.pipeline.speculative import RULE as SPECULATIVE_RULE
from models.build.pipeline.speculative import choose_speculative
from models.build.pipeline.threads import choose_threads
from models.build.pipeline.verify_graph import write_verify_graph
from models.build.train.student import STUDENT_FILE, assemble_student, student_made
from models.runtime.calibrate import CALIBRATION_PROMPT
from models.runtime.chat import ChatTemplate
from models.runtime.kernels import verify_graph_path
from models.runtime.manifest import SPECULATIVE, Manifest

__all__ = ["DEFAULT_HELDOUT", "DEFAULT_STUDENT", "DEFAULT_TEACHER", "BuildOptions",
           "build_ladder", "is_up_to_date", "replace_dir", "staging_dir"]


@dataclass
class Sources:
    """What a build is made from, and the key that names it."""

    teacher: Path
    student: Path | None  # a student checkpoint directory (or None)
    student_blocks: bool  # ``opts.student`` holds distilled blocks to assemble on the teacher
    record: dict[str, Any]  # for the manifest: names and hashes
    config: dict[str, Any]
    key: str


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


def resolve_sources(opts: BuildOptions) -> Sources:
    """The teacher and student checkpoints, their hashes and the build key."""
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
    record: dict[str, Any] = {"model": opts.model, "model_sha256": checkpoint_hash(teacher)}
    if student is not None or student_blocks:
        assert opts.student is not None
        record.update(student=str(opts.student),
                      student_sha256=checkpoint_hash(student or Path(opts.student)))
    if opts.distill_layers is not None and opts.corpus:
        record.update(corpus_sha256=hashlib.sha256(Path(opts.corpus).read_bytes()).hexdigest())
    config = opts.config_for_hash()
    # the key is what the sources hold, not where they lie: the same student in another clone,
    # or the same checkpoint under another path, is the same build
    key = _build_key({k: v for k, v in record.items() if k.endswith("_sha256")}, config)
    return Sources(teacher, student, student_blocks, record, config, key)


def prepare(opts: BuildOptions, src: Sources, out: Path, log: Log) -> stages.Build:
    """The staging directory with the tokenizer, the student made if it is made here, and the
    held-out and calibration token ids."""
    shutil.rmtree(out, ignore_errors=True)  # what a killed build left
    out.mkdir(parents=True)
    work = out / ".work"
    work.mkdir(exist_ok=True)
    student = src.student
    made = None
    if src.student_blocks:  # the student's own blocks + the teacher's shared embedding / head
        assert opts.student is not None
        student = assemble_student(src.teacher, Path(opts.student), work / "student")
        made = student_made(Path(opts.student))
    if opts.distill_layers is not None:
        assert opts.corpus is not None
        student = _distil(src.teacher, opts.distill_layers, opts.distill_steps, opts.corpus,
                          work, opts.threads, log)
    tok_path = save_tokenizer(src.teacher, out)
    tokenizer = Tokenizer.from_file(str(tok_path))
    if student is not None:
        s_tok = student / "tokenizer.json"
        if s_tok.is_file() and not same_vocab(tok_path, s_tok):
            raise BuildError(f"student {opts.student} does not share the teacher's vocabulary")
    hf_cfg = json.loads((src.teacher / "config.json").read_text())
    sources = {"full": ("teacher", src.teacher)}
    if student is not None:
        sources["distilled"] = ("student", student)
    return stages.Build(
        opts=opts, out=out, work=work, tokenizer=tokenizer, tokenizer_file=tok_path,
        context=normalized(hf_cfg)["max_position_embeddings"] or 2048,
        eos=eos_ids(src.teacher), heldout=heldout_ids(tokenizer, opts.heldout, opts.eval_tokens),
        prompt=tokenizer.encode(CALIBRATION_PROMPT, add_special_tokens=False).ids,
        template=ChatTemplate.for_directory(out), log=log,
        sources=sources, student_made=made)


def build_ladder(opts: BuildOptions, log: Log = print) -> tuple[Manifest, bool]:
    """Build (or confirm up to date) the ladder in ``opts.out``; return (manifest, built).
    A line at least every 30 s while it runs (:class:`Progress`)."""
    with Progress(_timed(log)) as progress:
        return _build(opts, progress)


def _build(opts: BuildOptions, log: Log) -> tuple[Manifest, bool]:
    src = resolve_sources(opts)
    final = opts.out
    if not opts.force and is_up_to_date(final, src.key):
        manifest = Manifest.load(final)
        _verify_graph(final, manifest, log, only_if_missing=True)
        stage_ran = False
        if manifest.threads_choice is None:
            log(f"ladder in {final} is up to date; measuring which rungs run on one core (a "
                "stage it was built without)")
            prompt = Tokenizer.from_file(str(final / manifest.tokenizer)).encode(
                CALIBRATION_PROMPT, add_special_tokens=False).ids
            manifest.threads_choice = choose_threads(final, manifest, opts.threads, prompt,
                                                     log=log)
            manifest.save(final)
            stage_ran = True
        choice = manifest.speculative_choice
        if opts.speculative and (choice is None or choice.get("rule") != SPECULATIVE_RULE):
            log(f"ladder in {final} is up to date; measuring the speculative rung (a stage it "
                "was built without, or under another rule)")
            manifest.variants.pop(SPECULATIVE, None)
            manifest.speculative_choice = choose_speculative(final, manifest, opts.threads,
                                                             log=log)
            manifest.save(final)
            return manifest, True
        if not stage_ran:
            log(f"ladder in {final} is up to date (build key {src.key[:12]}); nothing to do")
        return manifest, stage_ran

    # built beside its final place and renamed into it at the end: an interrupted build (or
    # one for another model) never leaves a manifest beside files it does not describe
    b = prepare(opts, src, staging_dir(final), log)
    key = decisions.key_for(src.record["model_sha256"], src.config)
    b.known = None if opts.race else decisions.lookup(key)
    if b.known is not None:
        b.known["cpu"] = decisions.cpu_class()
    stages.export_fp32(b)
    race.quantize_rungs(b)
    stages.choose_runtime(b)
    stages.score_tasks(b)
    manifest = stages.make_manifest(b, src.key, src.record, src.config)
    _verify_graph(b.out, manifest, log)
    log("measuring which rungs run on one core")
    manifest.threads_choice = choose_threads(b.out, manifest, opts.threads, b.prompt, log=log)
    if opts.speculative:  # a speculative rung, if a draft earns it
        recorded = (b.known or {}).get("speculative")
        log("measuring " + ("the recorded draft" if recorded else "drafts")
            + " for the speculative rung")
        manifest.speculative_choice = choose_speculative(b.out, manifest, opts.threads, log=log,
                                                         recorded=recorded)
        choice = manifest.speculative_choice
        if not choice.get("recorded") and "measurement failed" not in str(choice.get("why")):
            b.decided["speculative"] = choice.get("chosen") or SPECULATIVE_NONE
    if b.decided:  # races ran: the next build of this model on this CPU class reuses them
        log(f"  race outcomes recorded in {decisions.record(key, b.decided)}")
    manifest.save(b.out)
    shutil.rmtree(b.work, ignore_errors=True)
    replace_dir(b.out, final)
    log(f"ladder written to {final} ({len(manifest.variants)} variants, runtime "
        f"{manifest.runtime})")
    return manifest, True


def _verify_graph(ladder: Path, manifest: Manifest, log: Log,
                  only_if_missing: bool = False) -> None:
    """``full``'s batched verify graph beside it (the speculative rung verifies every row's
    drafts in one forward with it); also for a ladder built before it existed."""
    info = manifest.variants.get("full")
    if info is None:
        return
    graph = ladder / info.dir / info.file
    if only_if_missing and verify_graph_path(graph).is_file():
        return
    written = write_verify_graph(graph)
    log(f"  batched verify graph: {written.name}" if written else
        "  no batched verify graph (full's attention is not the form it rewrites)")


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


def _distil(teacher: Path, layers: int, steps: int, corpus: str, work: Path, threads: int,
            log: Log) -> Path:
    """Distil a ``layers``-block student from ``teacher`` on ``corpus`` (initialised from it)."""
    from models.build.train.distil import distil_on_corpus

    log(f"distilling a {layers}-layer student from {teacher} on {corpus} ({steps} steps)")
    try:
        return distil_on_corpus(teacher, layers, steps, Path(corpus), work, threads,
                                log=lambda _m: None)
    except ValueError as err:
        raise BuildError(str(err)) from err


def _timed(log: Log) -> Log:
    """``log`` with every line prefixed by the seconds since the build started."""
    started = time.monotonic()
    return lambda message: log(f"[{time.monotonic() - started:6.1f} s] {message}")
