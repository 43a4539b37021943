"""greenroute's own onnxruntime kernels (``kernels/``, C++): where the shared library is, and
registering it with a session. Built by ``make`` (``make kernels``) and in the image; a ladder
whose graphs use its operators (domain :data:`DOMAIN`) cannot load without it, and a build
without it races onnxruntime's operators only."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import onnxruntime as ort

DOMAIN = "greenroute"
OP_ROW_QUANT = "RowQuantMatMul"
# several new positions per row at batch > 1 (the speculative rung's verify forward)
OP_BATCHED_GQA = "BatchedGroupQueryAttention"
VERIFY_SUFFIX = ".verify.onnx"
NEW_COUNTS = "new_counts"  # the verify graph's extra input: each row's real new positions
LIBRARY_NAME = "libgreenroute_kernels.so"
# the quantization methods (manifest names) whose graphs use our operators
METHOD_PREFIX = "rowquant"
_DEFAULT = Path(__file__).resolve().parents[2] / "kernels" / "build" / LIBRARY_NAME
ENV_LIBRARY = "GREENROUTE_KERNELS_LIB"  # another build of the library (the image sets none)


class KernelsMissingError(RuntimeError):
    """A graph needs greenroute's kernels and the library is not built."""


def uses_kernels(quantization: str | None) -> bool:
    """Whether a variant quantized by ``quantization`` (the manifest's method) needs the
    library. onnxruntime-genai cannot load it (its sessions take custom operators only from
    inside the model's directory), so such variants always run on our engine."""
    return bool(quantization) and str(quantization).startswith(METHOD_PREFIX)


def verify_graph_path(model_path: Path) -> Path:
    """Where a graph's batched verify copy lives (written at build time, beside it)."""
    return model_path.with_name(model_path.stem + VERIFY_SUFFIX)


def library_path() -> Path | None:
    """The built library, or ``None`` (``make kernels`` builds it)."""
    path = Path(os.environ.get(ENV_LIBRARY) or _DEFAULT)
    return path if path.is_file() else None


def available() -> bool:
    return library_path() is not None


def register(options: ort.SessionOptions) -> bool:
    """Add the library's operators to ``options`` when it is built; returns whether it was."""
    path = library_path()
    if path is None:
        return False
    options.register_custom_ops_library(str(path))
    return True


def require(options: ort.SessionOptions, graph: str) -> None:
    """For a graph that uses our operators: register them or say what to run."""
    if not register(options):
        raise KernelsMissingError(f"{graph} uses greenroute's kernels ({DOMAIN}."
                                  f"{OP_ROW_QUANT}) and {_DEFAULT} is not built: run "
                                  "`make kernels`")


@functools.cache
def active_isa() -> str | None:
    """The instruction set the library runs on this CPU (``avx2``, ``avxvnni``,
    ``avx512vnni`` or ``scalar``; ``GREENROUTE_KERNEL_ISA`` can force a lesser one), or
    ``None`` without the library. Read once per process, as the library does."""
    path = library_path()
    if path is None:
        return None
    fn = ctypes.CDLL(str(path)).greenroute_kernel_isa
    fn.restype = ctypes.c_char_p
    return str(fn().decode())
