"""The serving path needs no torch, transformers or optimum (they are build-time only), and
imports no build code (``models.build``) and no benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_serving_imports_no_build_dependencies(tiny_ladder: Path) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings
with TestClient(create_app(Settings(ladder_dir={str(tiny_ladder)!r}, threads=1))) as c:
    import time
    for _ in range(200):
        if c.get("/ready").status_code == 200:
            break
        time.sleep(0.05)
    assert c.post("/v1/generate", json={{"prompt": "x", "max_new_tokens": 2}}).status_code == 200
banned = ("torch", "transformers", "optimum", "models.build", "bench")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in banned or m.startswith(banned))
print(",".join(heavy) or "none")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "none"
