"""What the build reads from a source checkpoint beside its weights: parameter count, EOS ids,
the tokenizer and chat-template files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from models.build.errors import BuildError
from models.runtime.chat import TEMPLATE_FILE

_TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", TEMPLATE_FILE)


def count_parameters(checkpoint: Path) -> int:
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


def eos_ids(checkpoint: Path) -> list[int]:
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


def save_tokenizer(checkpoint: Path, out: Path) -> Path:
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


def same_vocab(a: Path, b: Path) -> bool:
    ta, tb = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    return bool(ta.get_vocab() == tb.get_vocab())
