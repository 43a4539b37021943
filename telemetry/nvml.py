"""NVIDIA GPUs through NVML (pynvml): the total-energy counter, or integrated power samples.

* ``counter`` mode (Volta and newer): ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the
  driver loaded). The counter advances only every ~20-100 ms, so a window shorter than
  ``counter_period_s`` (or one over which it did not move) is reported as instantaneous power ×
  duration, with a note saying so — never a silent 0 J.
* ``sampling`` mode (older GPUs, or on request): a thread reads ``nvmlDeviceGetPowerUsage``
  (mW; a ~1 s moving average on Ampere and newer) ``sample_hz`` times a second and integrates it
  (trapezoids); a read between samples extends the last one to now.

NVML errors become :class:`MeterUnavailableError` at start-up (the factory then tries the next
meter); a read that fails later logs once and keeps the last good figure.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any, Literal

from telemetry.base import EnergyMeter, EnergyReading, Mark, MeterUnavailableError

with warnings.catch_warnings():  # pynvml 13 warns that it re-exports nvidia-ml-py
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

log = logging.getLogger(__name__)

Mode = Literal["auto", "counter", "sampling"]


def nvml_target(gpu_index: int | None, cuda_visible_devices: str | None) -> int | str:
    """The NVML device the service's ``cuda:0`` is: an explicit index, else the first entry of
    ``CUDA_VISIBLE_DEVICES`` (an index or a ``GPU-…``/``MIG-…`` UUID), else 0. NVML ignores
    ``CUDA_VISIBLE_DEVICES``, so this mapping is needed to read the right GPU."""
    if gpu_index is not None:
        return gpu_index
    first = (cuda_visible_devices or "").split(",")[0].strip()
    if not first:
        return 0
    return int(first) if first.isdigit() else first


class NvmlMeter(EnergyMeter):
    """One GPU's energy; ``device`` is ``cuda:<nvml index or uuid>``."""

    source = "nvml"

    def __init__(self, target: int | str = 0, mode: Mode = "auto", sample_hz: float = 10.0,
                 counter_period_s: float = 0.1) -> None:
        super().__init__()
        if sample_hz <= 0 or counter_period_s < 0:
            raise ValueError("sample_hz must be > 0 and counter_period_s >= 0")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise MeterUnavailableError(f"NVML: init failed: {err}") from err
        try:
            if isinstance(target, int):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(target)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(target)
            self.gpu_name = str(pynvml.nvmlDeviceGetName(self._handle))
            self.mode = self._choose_mode(mode)
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise MeterUnavailableError(f"NVML: GPU {target}: {err}") from err
        self.device = f"cuda:{target}"
        self.counter_period_s = counter_period_s
        self.sample_period_s = 1.0 / sample_hz
        self._read_failed = False
        self._total_j = 0.0
        self._power_w = self._read_power_w()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if self.mode == "counter":
            self._counter0_mj = self._counter_mj()
        else:
            self._sample_t = time.perf_counter()
            self._sampler = threading.Thread(target=self._sample_loop, name="nvml-power",
                                             daemon=True)
            self._sampler.start()

    def _choose_mode(self, mode: Mode) -> Literal["counter", "sampling"]:
        if mode != "auto":
            if mode == "counter":
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raise if unsupported
            return mode
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            return "counter"
        except pynvml.NVMLError as err:  # NotSupported before Volta
            log.info("NVML energy counter unavailable (%s): integrating power samples", err)
            return "sampling"

    # -- vendor reads (the single unit conversion: mJ and mW → J and W) ---------------------
    def _counter_mj(self) -> int:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _read_power_w(self) -> float:
        return float(pynvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def _guarded(self, read: Any, fallback: Any) -> Any:
        try:
            value = read()
            self._read_failed = False
            return value
        except pynvml.NVMLError as err:
            if not self._read_failed:
                log.warning("NVML read failed on %s: %s; keeping the last figure", self.device,
                            err)
            self._read_failed = True
            return fallback

    # -- the counter ------------------------------------------------------------------------
    def total_joules(self) -> float:
        with self._lock:
            if self.mode == "counter":
                mj = self._guarded(self._counter_mj, None)
                if mj is not None:
                    self._total_j = (mj - self._counter0_mj) / 1000.0
                return self._total_j
            # sampling: integrated samples, the last one extended to now
            return self._total_j + self._power_w * (time.perf_counter() - self._sample_t)

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_period_s):
            watts = self._guarded(self._read_power_w, None)
            with self._lock:
                now = time.perf_counter()
                if watts is None:
                    watts = self._power_w
                self._total_j += 0.5 * (self._power_w + watts) * (now - self._sample_t)
                self._power_w, self._sample_t = watts, now

    def end(self, mark: Mark) -> EnergyReading:
        reading = super().end(mark)
        if self.mode == "counter" and (reading.seconds < self.counter_period_s
                                       or reading.joules <= 0.0):
            watts = self._guarded(self._read_power_w, self._power_w)
            return EnergyReading(watts * reading.seconds, reading.seconds, self.source,
                                 self.device, False,
                                 f"window {1000 * reading.seconds:.1f} ms is shorter than the "
                                 "energy counter's update period: instantaneous power x time")
        return reading

    def note(self, joules: float, seconds: float) -> str | None:
        if self.mode == "sampling":
            return f"integrated power samples at {1 / self.sample_period_s:g} Hz"
        return None

    def describe(self) -> str:
        how = ("total-energy counter" if self.mode == "counter"
               else f"power samples at {1 / self.sample_period_s:g} Hz")
        return f"nvml on {self.device} ({self.gpu_name}, {how})"

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            log.warning("nvmlShutdown failed: %s", err)
