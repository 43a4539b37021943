"""fp32 ONNX export of a causal LM with KV cache, through optimum."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from models.build.source import BuildError

ONNX_FILE = "model.onnx"


def onnx_bytes(variant_dir: Path, onnx_file: str = ONNX_FILE) -> int:
    """Bytes of the graph plus its external-data file, if any."""
    total = (variant_dir / onnx_file).stat().st_size
    data = variant_dir / f"{onnx_file}.data"
    if data.exists():
        total += data.stat().st_size
    return total


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
