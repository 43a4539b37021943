"""Export a checkpoint and check the graph before the ladder is built on it: it must load in our
decoding loop and reproduce PyTorch's logits for the same tokens.

A user's architecture is exported by onnxruntime-genai's builder where the builder covers it;
a builder graph that our loop cannot drive (its sliding-window ``GroupQueryAttention`` needs a
KV buffer as long as the window, which a prefill from an empty cache does not have) or whose
logits are not PyTorch's is exported again with optimum where optimum covers the model type.
Anything else is one :class:`BuildError` line naming the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from models.build.errors import BuildError
from models.build.pipeline.export import (
    GENAI_BUILDER,
    OPTIMUM,
    architecture_of,
    export_decoder,
    export_fp32,
    exporters_for,
)
from models.runtime.engine.ort import OrtEngine

CHECK_TOKENS = 32
# fp32 graphs agree with PyTorch to ~1e-5 of the logits' scale (fused or not); a wrong graph
# (a lost norm, misplaced rotary dims) is off by the logits' own scale
RELATIVE_TOLERANCE = 1e-3


def pytorch_logits(checkpoint: Path, ids: Sequence[int]) -> np.ndarray:
    """Logits [T, V] of ``ids`` from transformers' fp32 model of ``checkpoint``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def logits_error(engine: OrtEngine, reference: np.ndarray, ids: Sequence[int]) -> float:
    """max |graph logits - PyTorch logits| / max |PyTorch logits|."""
    got = engine.logits(ids)
    return float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-6))


def export_verified(checkpoint: Path, vdir: Path, engine_for: Callable[[Path], OrtEngine],
                    ids: Sequence[int], opset: int, builder_python: str | None,
                    log: Callable[[str], None]) -> tuple[str, OrtEngine]:
    """Export ``checkpoint`` into ``vdir`` and load it; return (exporter, engine)."""
    check = list(ids[:CHECK_TOKENS])
    reference = pytorch_logits(checkpoint, check)
    exporter = export_fp32(checkpoint, vdir, opset, builder_python, log)
    while True:
        try:
            engine = engine_for(vdir)
            error = logits_error(engine, reference, check)
            if not error <= RELATIVE_TOLERANCE:
                raise ValueError(f"its logits differ from PyTorch's by {error:.2g} of their "
                                 f"scale (tolerance {RELATIVE_TOLERANCE:g})")
            return exporter, engine
        except Exception as err:  # onnxruntime and shape errors come in many types
            first = (str(err).splitlines() or [type(err).__name__])[0]
            if exporter == GENAI_BUILDER and OPTIMUM in exporters_for(checkpoint, None):
                log(f"  the genai builder's graph fails our check ({first[:200]}); "
                    "exporting with optimum instead")
                export_decoder(checkpoint, vdir, opset)
                exporter = OPTIMUM
                continue
            arch = architecture_of(checkpoint)[0]
            raise BuildError(f"{arch}: the graph {exporter} exported is not a KV-cache decoder "
                             f"greenroute can serve: {first}") from err
