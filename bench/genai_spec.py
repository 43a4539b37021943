"""onnxruntime-genai's own draft-model speculative decoding, as a peer for ``bench spec``.

Uses onnxruntime-genai 0.18.0 (``onnxruntime_genai``): base speculative decoding is enabled by a
``model.draft`` decoder block next to ``model.decoder`` in ``genai_config.json`` plus a top-level
``"speculative": {"max_draft_tokens": k}`` (k in [1, 16]); the runtime option of the same name is
set with ``GeneratorParams.set_speculative_options`` and the counters are read with
``Generator.get_speculative_stats()`` (``draft_tokens_accepted`` / ``draft_tokens_evaluated``).
Greedy, batch 1. The composite config is written to a temporary directory that links to the
ladder's ``full`` (target) and draft variant directories; the ladder itself is never modified.
Every prompt gets exactly ``new_tokens`` new tokens (``min_length`` = ``max_length``, so EOS is
masked). ``tokens_per_s`` is decode tokens/s after the first token, as in ``bench/spec.py``; the
plain genai ``Generator`` on the same target runs on the same prompts for comparison.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = "full"


def _decoder(variant_dir: Path, subdir: str, threads: int) -> dict[str, Any]:
    config = json.loads((variant_dir / "genai_config.json").read_text())
    block: dict[str, Any] = config["model"]["decoder"]
    block["filename"] = f"{subdir}/{block['filename']}"
    options = block.setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    return block


def _write_config(ladder: Path, draft: str | None, k: int, threads: int, root: Path) -> str:
    """A composite (or, with ``draft=None``, plain) genai config in ``root``; returns its path."""
    (root / "target").symlink_to((ladder / TARGET).resolve(), target_is_directory=True)
    config = json.loads((ladder / TARGET / "genai_config.json").read_text())
    config["model"]["decoder"] = _decoder(ladder / TARGET, "target", threads)
    if draft is not None:
        (root / "draft").symlink_to((ladder / draft).resolve(), target_is_directory=True)
        config["model"]["draft"] = _decoder(ladder / draft, "draft", threads)
        config["speculative"] = {"max_draft_tokens": k}
    (root / "genai_config.json").write_text(json.dumps(config, indent=2))
    return str(root)


def _generate(og: Any, model: Any, prompts: list[list[int]], new_tokens: int,
              k: int | None) -> dict[str, Any]:
    tokens: list[list[int]] = []
    decode_s = 0.0
    accepted = evaluated = 0
    for ids in prompts:
        params = og.GeneratorParams(model)
        total = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total,
                                  batch_size=1)
        if k is not None:
            params.set_speculative_options(max_draft_tokens=k)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        first = 0.0
        while not gen.is_done():
            gen.generate_next_token()
            first = first or time.perf_counter()
        decode_s += time.perf_counter() - first
        tokens.append([int(t) for t in gen.get_sequence(0)[len(ids):]])
        if k is not None:
            stats = gen.get_speculative_stats()
            accepted += int(stats.get("draft_tokens_accepted", 0))
            evaluated += int(stats.get("draft_tokens_evaluated", 0))
        del gen
    produced = sum(max(0, len(t) - 1) for t in tokens)
    return {
        "tokens_per_s": produced / max(1e-9, decode_s),
        "acceptance_rate": accepted / evaluated if evaluated else None,
        "tokens": tokens,
    }


def genai_speculative(ladder: Path, draft: str, k: int, prompts: list[list[int]],
                      new_tokens: int, threads: int = 2) -> dict[str, Any]:
    """Greedy genai speculative decoding of ``full`` drafted by ``draft`` with width ``k``.

    Returns ``tokens_per_s``, ``acceptance_rate`` (``None`` if nothing was drafted), the generated
    ``tokens`` per prompt, and ``plain`` (the same for genai's ordinary ``Generator`` on ``full``)
    with ``identical`` (how many prompts got the same tokens); or ``{"error": ...}``.
    """
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        return {"error": f"onnxruntime-genai not importable: {err}"}
    if not hasattr(og.GeneratorParams, "set_speculative_options"):
        return {"error": f"onnxruntime-genai {og.__version__} has no speculative decoding"}
    if not 1 <= k <= 16:
        return {"error": f"genai speculative decoding needs 1 <= k <= 16, got {k}"}
    try:
        with tempfile.TemporaryDirectory(prefix="genai-spec-") as tmp:
            spec_dir, plain_dir = Path(tmp) / "spec", Path(tmp) / "plain"
            spec_dir.mkdir()
            plain_dir.mkdir()
            spec_model = og.Model(_write_config(ladder, draft, k, threads, spec_dir))
            _generate(og, spec_model, prompts[:1], min(8, new_tokens), k)  # warm-up
            result = _generate(og, spec_model, prompts, new_tokens, k)
            del spec_model
            plain_model = og.Model(_write_config(ladder, None, k, threads, plain_dir))
            _generate(og, plain_model, prompts[:1], min(8, new_tokens), None)
            plain = _generate(og, plain_model, prompts, new_tokens, None)
            del plain_model
    except Exception as err:  # a runtime refusal is a result here: say why in one line
        text = str(err).strip()
        return {"error": text.splitlines()[0] if text else repr(err)}
    identical = sum(a == b for a, b in zip(result["tokens"], plain["tokens"], strict=True))
    result["k"] = k
    result["draft"] = draft
    result["genai_version"] = og.__version__
    result["plain"] = {"tokens_per_s": plain["tokens_per_s"]}
    result["identical"] = f"{identical}/{len(prompts)}"
    return result
