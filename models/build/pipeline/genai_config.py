"""``genai_config.json`` for an optimum-exported decoder, so onnxruntime-genai can run that graph.

onnxruntime-genai's own model builder would write this file, but it needs transformers 5.x while
optimum-onnx needs < 4.58; describing optimum's graph (its input/output names, no shared KV
buffer) lets genai's C++ generation loop drive the very same ONNX file our own engine runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def normalized(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The attributes every decoder has, under their common names, read through transformers'
    config class for the model type (its ``attribute_map``: GPT-2's ``n_head``, ``n_embd``,
    ``n_layer``, ``n_positions`` are ``num_attention_heads``, ``hidden_size``...). A model type
    transformers does not know is read as written."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type", "")
    # (CONFIG_MAPPING is lazy: its ``get`` always answers None, ``in`` and ``[]`` work)
    cfg: Any = (CONFIG_MAPPING[model_type].from_dict(hf_config)
                if model_type in CONFIG_MAPPING else None)

    def get(name: str, default: Any = None) -> Any:
        value = getattr(cfg, name, None) if cfg is not None else None
        return hf_config.get(name, default) if value is None else value

    def number(name: str) -> int:
        value = get(name)
        return int(value) if isinstance(value, int | float) else 0

    heads, hidden = number("num_attention_heads"), number("hidden_size")
    return {  # 0: the config does not say (state-space models have no attention heads)
        "num_attention_heads": heads,
        "hidden_size": hidden,
        "num_hidden_layers": number("num_hidden_layers"),
        "num_key_value_heads": number("num_key_value_heads") or heads,
        "head_dim": number("head_dim") or (hidden // heads if heads else 0),
        "max_position_embeddings": number("max_position_embeddings"),
        "vocab_size": number("vocab_size"),
    }


def genai_config(hf_config: dict[str, Any], onnx_filename: str, threads: int,
                 device: str = "cpu") -> dict[str, Any]:
    """The config dict for one variant directory (``hf_config`` is its ``config.json``)."""
    norm = normalized(hf_config)
    heads, hidden = norm["num_attention_heads"], norm["hidden_size"]
    eos = hf_config.get("eos_token_id", 0)
    provider_options: list[dict[str, Any]] = [{"cuda": {}}] if device == "cuda" else []
    return {
        "model": {
            "bos_token_id": hf_config.get("bos_token_id", eos),
            "context_length": norm["max_position_embeddings"],
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1,
                    "provider_options": provider_options,
                },
                "filename": onnx_filename,
                "head_size": norm["head_dim"],
                "hidden_size": hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": norm["num_hidden_layers"],
                "num_key_value_heads": norm["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": hf_config.get("pad_token_id", eos),
            "type": hf_config.get("model_type", "llama"),
            "vocab_size": norm["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": norm["max_position_embeddings"],
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(variant_dir: Path, onnx_filename: str, threads: int,
                       device: str = "cpu") -> Path:
    """Write ``genai_config.json`` beside the variant's ``config.json``; return its path."""
    hf = json.loads((variant_dir / "config.json").read_text())
    path = variant_dir / "genai_config.json"
    path.write_text(json.dumps(genai_config(hf, onnx_filename, threads, device), indent=2) + "\n")
    return path


def adapt_builder_genai_config(variant_dir: Path, base_dir: Path, onnx_filename: str,
                               threads: int, device: str = "cpu") -> Path:
    """For a graph written by onnxruntime-genai's builder (or quantized from one): the builder's
    own ``genai_config.json`` from ``base_dir`` (shared KV buffer, its input names), with our
    file name and session options, written into ``variant_dir``."""
    cfg = json.loads((base_dir / "genai_config.json").read_text())
    decoder = cfg["model"]["decoder"]
    decoder["filename"] = onnx_filename
    options = decoder.setdefault("session_options", {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    options["provider_options"] = [{"cuda": {}}] if device == "cuda" else []
    path = variant_dir / "genai_config.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path
