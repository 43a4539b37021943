"""fp32 ONNX export of a causal LM with KV cache: onnxruntime-genai's model builder where it covers
the architecture, optimum's exporter otherwise.

The builder writes a fused graph (``GroupQueryAttention`` with rotary embedding inside,
``SkipSimplifiedLayerNormalization``, one QKV ``MatMul``): ~100 nodes for the default 8-layer
Llama against ~1,360 from optimum, which is what sets decode speed at this model size. It needs
transformers 5.x while optimum-onnx needs < 4.58, so it runs as a subprocess in its own
environment (``BUILDER_PYTHON``, created by ``make``; see ``genai-builder-requirements.txt``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from models.build.errors import BuildError
from models.runtime.manifest import onnx_bytes  # noqa: F401 (re-exported for the pipeline)

ONNX_FILE = "model.onnx"
OPTIMUM = "optimum"
GENAI_BUILDER = "genai-builder"
_HF_SIDECARS = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")
# Text decoders whose graph onnxruntime-genai 0.18.0's builder writes as a plain
# GroupQueryAttention decoder (its builder.py dispatch, less the MoE, multimodal, state-space and
# remote-code entries); the pin is in genai-builder-requirements.txt. Others go to optimum.
GENAI_BUILDER_ARCHITECTURES = frozenset({
    "Ernie4_5ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "GraniteForCausalLM", "HunYuanDenseV1ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
    "NemotronForCausalLM", "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM"})
# optimum model types that are encoder-decoder or otherwise no decoder-only ``ForCausalLM``
_OPTIMUM_NOT_DECODERS = frozenset({"bart", "bigbird_pegasus", "blenderbot", "blenderbot-small",
                                   "marian", "mbart", "pegasus"})


def optimum_model_types() -> list[str]:
    """Model types optimum-onnx exports for ``text-generation-with-past`` (decoders only)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(m for m, by in TasksManager._SUPPORTED_MODEL_TYPE.items()
                  if "text-generation-with-past" in by.get("onnx", {})
                  and m not in _OPTIMUM_NOT_DECODERS)


def architecture_of(checkpoint: Path) -> tuple[str, str]:
    """(architecture, model type) from the checkpoint's ``config.json``."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    archs = cfg.get("architectures") or ["?"]
    return str(archs[0]), str(cfg.get("model_type", "?"))


def builder_not_used(checkpoint: Path) -> str | None:
    """Why the genai builder is not used for ``checkpoint`` although it may export it, or None.

    Its sliding-window attention (``GroupQueryAttention`` with ``local_window_size``) needs a KV
    buffer at least as long as the window on every call, which our loop's prefill from an empty
    cache (quality evaluation) does not give it; optimum's graph of the same model runs."""
    arch, _ = architecture_of(checkpoint)
    if arch not in GENAI_BUILDER_ARCHITECTURES:
        return f"it does not cover {arch}"
    cfg = json.loads((checkpoint / "config.json").read_text())
    window = cfg.get("sliding_window")
    if isinstance(window, int) and cfg.get("use_sliding_window", True):
        return f"{arch} has sliding-window attention ({window} tokens)"
    return None


def exporters_for(checkpoint: Path, builder_python: str | None) -> list[str]:
    """The exporters to try, best first; a :class:`BuildError` naming the architecture and what
    is supported when neither covers it."""
    arch, model_type = architecture_of(checkpoint)
    by_builder = arch in GENAI_BUILDER_ARCHITECTURES
    optimum_types = optimum_model_types()
    by_optimum = model_type.replace("_", "-") in optimum_types or model_type in optimum_types
    if not (by_builder or by_optimum):
        builder = ", ".join(sorted(GENAI_BUILDER_ARCHITECTURES))
        raise BuildError(
            f"{checkpoint.name}: architecture {arch} (model type {model_type}) is not supported:"
            f" onnxruntime-genai's builder exports {builder}; optimum exports the model types "
            f"{', '.join(optimum_types)}")
    use_builder = by_builder and bool(builder_python) and (
        not by_optimum or builder_not_used(checkpoint) is None)
    order = ([GENAI_BUILDER] if use_builder else []) + ([OPTIMUM] if by_optimum else [])
    if not order:
        raise BuildError(f"{checkpoint.name}: architecture {arch} is exported only by "
                         "onnxruntime-genai's builder: pass --genai-builder PYTHON (make creates "
                         ".venv-builder)")
    return order


def export_decoder(checkpoint: Path, out_dir: Path, opset: int = 18) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` (fp32, ``text-generation-with-past``)."""
    from optimum.exporters.onnx import main_export

    if out_dir.exists():
        shutil.rmtree(out_dir)
    for name in ("optimum", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            main_export(
                str(checkpoint),
                output=out_dir,
                task="text-generation-with-past",
                opset=opset,
                device="cpu",
                dtype="fp32",
                do_validation=False,
                local_files_only=True,
            )
    except Exception as err:  # export failures surface as many types; one line for the user
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BuildError(f"ONNX export of {checkpoint} failed: {msg}") from err
    if not (out_dir / ONNX_FILE).is_file():
        raise BuildError(f"ONNX export of {checkpoint} produced no {ONNX_FILE}")
    return out_dir / ONNX_FILE


def default_genai_builder() -> str | None:
    """``$GREENROUTE_GENAI_BUILDER``, else the source checkout's ``.venv-builder`` (made by
    ``make``) when it exists, else ``None`` (optimum exports everything)."""
    local = Path(__file__).resolve().parents[3] / ".venv-builder" / "bin" / "python"
    return os.environ.get("GREENROUTE_GENAI_BUILDER") or (str(local) if local.is_file() else None)


def export_with_genai_builder(checkpoint: Path, out_dir: Path, builder_python: str,
                              timeout_s: float = 1800.0) -> Path:
    """fp32 export through ``python -m onnxruntime_genai.models.builder`` run by
    ``builder_python`` (offline); the variant directory also gets the checkpoint's configs."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache = out_dir.parent / f".{out_dir.name}-builder-cache"
    cmd = [builder_python, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint),
           "-o", str(out_dir), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildError(f"genai builder could not run ({builder_python}): {err}") from err
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out_dir / ONNX_FILE).is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise BuildError(f"genai builder could not export {checkpoint}: "
                         f"{lines[-1] if lines else f'exit {proc.returncode}'}")
    for name in _HF_SIDECARS:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)
    _state_head_dim(out_dir / "config.json")
    return out_dir / ONNX_FILE


def _state_head_dim(config_file: Path) -> None:
    """Write the KV head size into the variant's copy of ``config.json`` where the checkpoint
    saved ``"head_dim": null`` (Mistral does): the builder's graphs leave it symbolic and a
    quantized copy of the variant (no ``genai_config.json`` yet) reads it from there."""
    from models.build.pipeline.genai_config import normalized

    cfg = json.loads(config_file.read_text())
    if "head_dim" in cfg and cfg["head_dim"] is None:
        cfg["head_dim"] = normalized(cfg)["head_dim"]
        config_file.write_text(json.dumps(cfg, indent=2) + "\n")


def export_fp32(checkpoint: Path, out_dir: Path, opset: int, builder_python: str | None,
                log: Callable[[str], None]) -> str:
    """Export with the genai builder when one is given and it covers the architecture, else
    optimum; return which exporter made the graph. Neither covering it is a one-line
    :class:`BuildError`."""
    order = exporters_for(checkpoint, builder_python)
    if builder_python and order[0] != GENAI_BUILDER:
        log(f"  genai builder not used: {builder_not_used(checkpoint)}; exporting with optimum")
    for exporter in order:
        if exporter == OPTIMUM:
            export_decoder(checkpoint, out_dir, opset)
            return OPTIMUM
        assert builder_python is not None
        try:
            export_with_genai_builder(checkpoint, out_dir, builder_python)
            return GENAI_BUILDER
        except BuildError as err:
            if OPTIMUM not in order:
                raise
            log(f"  {err}; exporting with optimum instead")
    raise AssertionError("unreachable: exporters_for returns at least one exporter")


def copy_sidecars(src_dir: Path, dst_dir: Path) -> None:
    """Copy config/tokenizer files so the quantized directory is a complete variant."""
    for f in src_dir.iterdir():
        if f.is_file() and f.suffix == ".json" and f.name != "genai_config.json":
            shutil.copy2(f, dst_dir / f.name)
