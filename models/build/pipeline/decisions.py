"""Race decisions recorded per model and CPU class, so that a build does not race again what
was decided before on the same kind of machine.

A build's races (which 8-bit method makes ``int8``, whether a 4-bit rung earns its place, which
draft and k make the speculative rung) take most of a first build, and their outcome depends
on the model, the instruction sets onnxruntime's kernels pick from, onnxruntime's version and
the candidate list, not on the machine's noise. Each race that ran is recorded under that key
in the user's cache (``decisions.json`` beside the default ladder); the repository ships the
decisions of the machines it was built on (``models/default/decisions.json``). A build whose key
is recorded builds and checks only the recorded picks (the exactness check and the quality
measurement still run; a recorded pick that fails them makes the build race after all), and
the manifest says the decision was recorded. ``greenroute build --race`` races anyway and
records the new outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from models.build.pipeline.options import PACKAGE_DIR
from models.runtime.host import isa_flags
from models.runtime.manifest import default_ladder_dir

SHIPPED = PACKAGE_DIR / "default" / "decisions.json"
NOISE = 0.05  # a measurement's run-to-run spread here: a figure this close to its threshold is
# measured again before a rule decides on it (the 4-bit race, the speculative and threads stages)
FILE = "decisions.json"
ENV_FILE = "GREENROUTE_DECISIONS_FILE"  # another user file (the tests' own)


def near(value: float, threshold: float) -> bool:
    """Whether ``value`` lies within :data:`NOISE` of ``threshold`` (relative)."""
    return abs(value / threshold - 1.0) < NOISE


def user_file() -> Path:
    return Path(os.environ.get(ENV_FILE) or default_ladder_dir().parent / FILE)


def cpu_class() -> str:
    """What decides which kernels run: the architecture and the instruction sets seen."""
    return f"{platform.machine()}: {' '.join(isa_flags()) or 'no SIMD flags read'}"


def key_for(model_sha256: str, config: dict[str, Any]) -> str:
    """The key of a model's decisions on this CPU class, with onnxruntime's version and the
    candidates raced (from the build's hashed config)."""
    raced = json.dumps({k: config.get(k) for k in ("quant_candidates", "onnxruntime",
                                                    "consider_int4")}, sort_keys=True)
    digest = hashlib.sha256(raced.encode()).hexdigest()[:16]
    return f"{model_sha256[:16]} | {cpu_class()} | {digest}"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(key: str) -> dict[str, Any] | None:
    """The recorded decisions for ``key`` (the user's own first, then the shipped ones)."""
    for path in (user_file(), SHIPPED):
        found = _read(path).get(key)
        if isinstance(found, dict):
            return {**found, "recorded_in": str(path)}
    return None


def record(key: str, decided: dict[str, Any]) -> Path:
    """Keep this build's race outcomes under ``key`` in the user's file (merged with what it
    holds); returns the file."""
    path = user_file()
    data = _read(path)
    data[key] = {**data.get(key, {}), **decided}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
