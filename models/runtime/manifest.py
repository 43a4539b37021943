"""``manifest.json``: what a built ladder holds, how each variant was made and how good it is.

Written by the build (``models.build.pipeline``), read by serving and routing; plain JSON, no torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, computed_field

SCHEMA_VERSION = 1


def cache_root() -> Path:
    """``$GREENROUTE_CACHE_DIR`` or ``~/.cache/greenroute``: built ladders, converted sources."""
    return Path(os.environ.get("GREENROUTE_CACHE_DIR") or Path.home() / ".cache" / "greenroute")


def default_ladder_dir() -> Path:
    """``$GREENROUTE_CACHE_DIR/ladder`` or ``~/.cache/greenroute/ladder``."""
    return cache_root() / "ladder"

VARIANT_ORDER = ("full", "int8", "int4", "distilled", "distilled-int8", "full-speculative")
SPECULATIVE = "full-speculative"  # the rung that serves full's exact output, drafted


class Calibration(BaseModel):
    """Measured cost on the build host (seeds the router's cost model)."""

    prefill_ms_per_token: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    threads: int
    device: str = "cpu"


class SpeculativeInfo(BaseModel):
    """How the speculative rung drafts, chosen by measurement at build time."""

    target: str  # the variant whose output it reproduces exactly
    draft: str  # the variant that proposes tokens
    k: int  # tokens drafted per round
    acceptance_rate: float  # share of drafted tokens the target kept (greedy, build prompts)
    speedup: float  # decode tokens/s over the target's, measured side by side
    candidates: dict[str, Any] = Field(default_factory=dict)  # every draft x k measured

    @computed_field  # type: ignore[prop-decorator]
    @property
    def min_acceptance(self) -> float:
        """The share of drafted tokens kept below which a round costs more than the plain
        steps it replaces (a request pauses drafting there), derived from the measurements
        above rather than stored, so a ladder built by older code gets today's rule.

        A round yields ``1 + k·a`` tokens at acceptance ``a`` (the kept drafts and the
        target's own token) and was measured ``speedup`` times faster than plain steps, so it
        costs ``(1 + k·acceptance_rate) / speedup`` plain steps; it breaks even where
        ``1 + k·a`` equals that."""
        return break_even(self.acceptance_rate, self.k, self.speedup)


def break_even(acceptance: float, k: int, speedup: float) -> float:
    """Acceptance (kept / drafted) at which a round of ``k`` drafts, measured ``speedup``
    times faster than plain decoding at ``acceptance``, costs what its tokens cost plainly."""
    if k < 1 or speedup <= 0:
        return 1.0
    round_cost = (1 + k * acceptance) / speedup  # in plain steps
    return round(min(1.0, max(0.0, (round_cost - 1) / k)), 4)


class VariantInfo(BaseModel):
    """One rung of the ladder."""

    name: str
    dir: str  # relative to the ladder directory
    file: str  # ONNX file name inside ``dir``
    source: str  # "teacher" or "student"
    parameters: int
    bytes: int  # ONNX graph + external weights on disk
    precision: str  # "fp32", "int8", "int4"
    quantization: str | None = None  # method, e.g. "matmulnbits-8bit-block32"
    exporter: str = "optimum"  # who wrote the fp32 graph: "genai-builder" or "optimum"
    perplexity: float
    quality: float = Field(ge=0.0)  # ppl_full / ppl_variant; 1.0 for full
    top1_agreement: float = Field(ge=0.0, le=1.0)  # next-token argmax agreement with full
    # share of the committed question set answered correctly (greedy, chat template); None when
    # the build ran without a task set
    task_score: float | None = Field(default=None, ge=0.0, le=1.0)
    calibration: Calibration | None = None
    speculative: SpeculativeInfo | None = None  # set on the speculative rung only
    # the threads the service runs it on unless told otherwise: a measured build result
    # (Manifest.threads_choice); None: the service's thread count
    serve_threads: int | None = Field(default=None, ge=1)
    # how a student was made (its structure, the blocks it keeps, its healing run), as its
    # training recorded it; None for the teacher's rungs
    made: dict[str, Any] | None = None


class Manifest(BaseModel):
    """The whole ladder."""

    schema_version: int = SCHEMA_VERSION
    build_key: str  # hash of source checkpoints + build config: unchanged → no rebuild
    source: dict[str, Any]
    build_config: dict[str, Any]
    created_at: str
    host: dict[str, Any]
    tokenizer: str  # file name, relative to the ladder directory
    context_length: int
    eos_token_ids: list[int]
    runtime: str  # engine chosen to serve: "onnxruntime" or "onnxruntime-genai"
    runtime_choice: dict[str, Any]  # why: measurements of both engines
    quantization_choice: dict[str, Any]  # why: measurements of every candidate method
    # the speculative rung's draft x k measurements and choice (None: the stage has not run)
    speculative_choice: dict[str, Any] | None = None
    # which rungs run on one core: each measured on one thread and on the build's count (None:
    # a ladder built before the stage; the service then runs every rung on its thread count)
    threads_choice: dict[str, Any] | None = None
    heldout: dict[str, Any]
    tasks: dict[str, Any] | None = None  # question-set file, count, each variant's answers
    chat_template: str = "fallback"  # "checkpoint": the source's own template ships in the ladder
    variants: dict[str, VariantInfo]

    @classmethod
    def load(cls, ladder_dir: Path) -> Manifest:
        return cls.model_validate_json((ladder_dir / "manifest.json").read_text())

    def save(self, ladder_dir: Path) -> Path:
        """Write atomically (a reader never sees half a manifest), readable like the ladder's
        other files: mkstemp's 0600 would hide it from a service running as another user (the
        image builds as root and serves as uid 10001)."""
        path = ladder_dir / "manifest.json"
        fd, tmp = tempfile.mkstemp(dir=ladder_dir, prefix=".manifest-", suffix=".json")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def serve_threads(self) -> dict[str, int]:
        """Each rung's measured thread count where the build chose one."""
        return {n: v.serve_threads for n, v in self.variants.items() if v.serve_threads}

    def reference(self) -> set[str]:
        """The rungs that give ``full``'s exact output: the teacher's unquantized graph and
        the speculative rungs that verify with it (floors of 1.0 may go to these)."""
        exact = {n for n, v in self.variants.items()
                 if v.source == "teacher" and v.quantization is None and v.speculative is None}
        return exact | {n for n, v in self.variants.items()
                        if v.speculative is not None and v.speculative.target in exact}

    def ordered(self) -> list[VariantInfo]:
        """Variants in ladder order (full first), unknown names last."""
        rank = {n: i for i, n in enumerate(VARIANT_ORDER)}
        return sorted(self.variants.values(), key=lambda v: (rank.get(v.name, 99), v.name))


def onnx_bytes(variant_dir: Path, onnx_file: str = "model.onnx") -> int:
    """Bytes of the graph plus its external-data file, if any (what ``VariantInfo.bytes``
    records at build time and a load checks)."""
    total = (variant_dir / onnx_file).stat().st_size
    data = variant_dir / f"{onnx_file}.data"
    if data.exists():
        total += data.stat().st_size
    return total
