"""A pynvml stand-in for a whole process (put this directory first on ``PYTHONPATH``): one GPU
drawing ``FAKE_NVML_WATTS`` since ``FAKE_NVML_T0`` (a ``time.time()``), so every process that
reads it sees the same energy counter, as with a real device. The pynvml calls greenroute
makes, nothing else (``tests/telemetry/fakes.py`` holds the per-test fake)."""

from __future__ import annotations

import os
import time
from typing import Any


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801, N818 (pynvml's names)
    pass


def _watts() -> float:
    return float(os.environ.get("FAKE_NVML_WATTS", "150"))


def nvmlInit() -> None:  # noqa: N802
    pass


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlDeviceGetHandleByIndex(index: int) -> Any:  # noqa: N802
    return ("fake", index)


def nvmlDeviceGetHandleByUUID(uuid: str) -> Any:  # noqa: N802
    return ("fake", uuid)


def nvmlDeviceGetName(handle: Any) -> str:  # noqa: N802
    return "Fake GPU (pynvml stand-in)"


def nvmlDeviceGetTotalEnergyConsumption(handle: Any) -> int:  # noqa: N802
    """mJ since the fake device's start."""
    t0 = float(os.environ.get("FAKE_NVML_T0", "0"))
    return int((time.time() - t0) * _watts() * 1000)


def nvmlDeviceGetPowerUsage(handle: Any) -> int:  # noqa: N802
    return int(_watts() * 1000)
