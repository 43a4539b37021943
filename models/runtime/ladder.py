"""Load a built ladder for serving: one engine per variant; one broken variant spares the rest."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from models.runtime import kernels
from models.runtime.engine.base import Engine, VariantLoadError
from models.runtime.engine.ort import shares_kv_buffer
from models.runtime.manifest import Manifest, VariantInfo, onnx_bytes

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "onnxruntime", "onnxruntime-genai")


@dataclass
class LoadedLadder:
    """Engines that loaded, and a one-line reason for each variant that did not."""

    directory: Path
    manifest: Manifest
    engines: dict[str, Engine] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def info(self, name: str) -> VariantInfo:
        return self.manifest.variants[name]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def load_engine(ladder_dir: Path, manifest: Manifest, variant: VariantInfo, tokenizer: Tokenizer,
                runtime: str, device: str, threads: int, wide_threads: int = 0,
                wide_from_rows: int = 0) -> Engine:
    """Build the engine for one variant with the requested runtime (our engine with a wide
    session on ``wide_threads`` for forwards of at least ``wide_from_rows`` rows or tokens,
    when that is more than ``threads``)."""
    vdir = ladder_dir / variant.dir
    if variant.speculative is not None:
        raise VariantLoadError("the speculative rung is assembled from loaded variants")
    if runtime == "onnxruntime-genai":
        from models.runtime.engine.genai import GenaiEngine

        if kernels.uses_kernels(variant.quantization):
            raise VariantLoadError(f"{variant.name} runs greenroute's own operator "
                                   f"({variant.quantization}), which onnxruntime-genai cannot "
                                   "load: serve it with --runtime onnxruntime (or auto)")

        return GenaiEngine(vdir, tokenizer, manifest.context_length, manifest.eos_token_ids,
                           device=device)
    from models.runtime.engine.ort import OrtEngine

    return OrtEngine(vdir / variant.file, tokenizer, manifest.context_length,
                     manifest.eos_token_ids, device=device, threads=threads,
                     wide_threads=wide_threads, wide_from_rows=wide_from_rows)


def runtime_for(requested: str, built: str, quantization: str | None,
                shares_kv: Callable[[], bool]) -> str:
    """The runtime a variant loads on: ``requested`` unless it is ``auto``, where our engine
    takes the builder's shared-KV graphs (it batches them continuously; onnxruntime-genai's
    Generator runs one sequence at a time on CPU, whatever its batch-1 race said) and every
    graph on greenroute's own operator (genai cannot load it), and the build's choice
    ``built`` the rest."""
    if requested != "auto":
        return requested
    return "onnxruntime" if kernels.uses_kernels(quantization) or shares_kv() else built


def load_ladder(
    ladder_dir: Path,
    device: str = "cpu",
    threads: int = 2,
    runtime: str = "auto",
    only: list[str] | None = None,
    warmup: bool = True,
    variant_threads: Mapping[str, int] | None = None,
    wide_from_rows: int = 0,
) -> LoadedLadder:
    """Load every variant in ``ladder_dir`` (or those in ``only``), each with ``threads``
    intra-op threads or its own count from ``variant_threads`` (``None``: the manifest's
    measured ``serve_threads``; ``{}``: none of its own); a variant given fewer than
    ``threads`` also gets a session on ``threads`` for forwards of at least
    ``wide_from_rows`` rows or tokens (0: none).

    ``runtime="auto"`` uses our engine where it batches (shared-KV graphs), else the
    manifest's measured choice. Raises :class:`VariantLoadError` only
    when the manifest or tokenizer is unusable; a single variant's failure is recorded in
    ``failed`` and logged.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    try:
        manifest = Manifest.load(ladder_dir)
    except FileNotFoundError as err:
        raise VariantLoadError(f"no manifest.json in {ladder_dir}: build the ladder first "
                               "(greenroute build)") from err
    except ValueError as err:
        raise VariantLoadError(f"invalid manifest in {ladder_dir}: "
                               f"{str(err).splitlines()[0]}") from err
    try:
        tokenizer = Tokenizer.from_file(str(ladder_dir / manifest.tokenizer))
    except Exception as err:  # tokenizers raises a bare Exception
        raise VariantLoadError(f"cannot load tokenizer {manifest.tokenizer}: {err}") from err
    ladder = LoadedLadder(ladder_dir, manifest)
    if variant_threads is None:
        variant_threads = manifest.serve_threads()
    for variant in manifest.ordered():
        if only is not None and variant.name not in only:
            continue
        if variant.speculative is not None:
            _add_speculative(ladder, variant, device, threads, warmup, variant_threads or {})
            continue
        where = f"{variant.dir}/{variant.file}"
        try:  # files changed since the build (a half-finished copy, another build's graph)
            on_disk = onnx_bytes(ladder_dir / variant.dir, variant.file)
            changed = None if on_disk == variant.bytes else (
                f"cannot load {where}: it holds {on_disk} bytes where the manifest says "
                f"{variant.bytes}; rebuild the ladder (greenroute build --force)")
        except FileNotFoundError:
            changed = f"{where} not found; rebuild the ladder (greenroute build --force)"
        if changed:
            ladder.failed[variant.name] = changed
            log.error("variant %s not loaded: %s", variant.name, changed)
            continue
        chosen = runtime_for(runtime, manifest.runtime, variant.quantization,
                             functools.partial(shares_kv_buffer, ladder_dir / variant.dir))
        try:
            own = (variant_threads or {}).get(variant.name, threads)
            engine = load_engine(ladder_dir, manifest, variant, tokenizer, chosen, device, own,
                                 threads if own < threads else 0, wide_from_rows)
            if warmup:
                engine.warmup()
        except VariantLoadError as err:
            ladder.failed[variant.name] = str(err)
            log.error("variant %s not loaded: %s", variant.name, err)
            continue
        ladder.engines[variant.name] = engine
    return ladder


def _add_speculative(ladder: LoadedLadder, variant: VariantInfo, device: str, threads: int,
                     warmup: bool, variant_threads: Mapping[str, int]) -> None:
    """The speculative rung shares its target's and draft's sessions (loaded for their own
    rungs, or here when only the speculative rung was asked for)."""
    from models.runtime.engine.ort import OrtEngine
    from models.runtime.engine.speculative import SpeculativeEngine

    spec = variant.speculative
    assert spec is not None
    engines: dict[str, OrtEngine] = {}
    try:
        for role in (spec.target, spec.draft):
            engine = ladder.engines.get(role)
            if not isinstance(engine, OrtEngine):
                info = ladder.manifest.variants[role]
                engine = OrtEngine(ladder.directory / info.dir / info.file,
                                   Tokenizer.from_file(str(ladder.directory
                                                           / ladder.manifest.tokenizer)),
                                   ladder.manifest.context_length,
                                   ladder.manifest.eos_token_ids, device=device,
                                   threads=variant_threads.get(role, threads))
            engines[role] = engine
        rung = SpeculativeEngine(engines[spec.target], engines[spec.draft], spec.k,
                                 spec.min_acceptance)
        if warmup:
            rung.warmup()
    except (VariantLoadError, ValueError, KeyError) as err:
        ladder.failed[variant.name] = str(err).splitlines()[0]
        log.error("variant %s not loaded: %s", variant.name, err)
        return
    ladder.engines[variant.name] = rung
