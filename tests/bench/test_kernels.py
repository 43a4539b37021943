"""``greenroute bench kernels`` on a small matrix: every path this CPU has is measured in its
own process beside onnxruntime's two operators, and the report names the CPU and its flags."""

from __future__ import annotations

import pytest

from bench.kernels import isa_paths, report, run_bench
from models.runtime import kernels
from models.runtime.host import cpu_name


@pytest.mark.skipif(not kernels.available(), reason="greenroute's kernels are not built")
def test_each_path_is_timed_beside_onnxruntimes_operators() -> None:
    figures = run_bench(k=64, n=40, rows=(1, 3), rounds=1)
    assert list(figures["paths"]) == isa_paths()
    for isa, result in figures["paths"].items():
        assert result["isa"] == isa  # the child ran the path it was asked for
        assert set(result["us"]) == {"1", "3"}
        for us in result["us"].values():
            assert set(us) == {"fp32", "nbits8", "rowquant", "rowquant-a16"}
            assert min(us.values()) > 0
    text = report(figures)
    assert cpu_name() in text and len(text.splitlines()) == 4 + 2 * len(isa_paths())
