"""Energy telemetry: meters (NVML, RAPL, estimate), per-request windows, Prometheus metrics."""
