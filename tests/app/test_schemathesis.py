"""Schemathesis against the real service: every check, over 2,000 generated cases across every
operation of the OpenAPI document, and no failure.

The server runs on the tiny ladder (``greenroute serve`` under uvicorn, like production) with
API keys set, so the document declares bearer auth and the ``ignored_auth`` check sends
requests without the key. Its limits are small enough that every request the document calls
valid fits the tiny model's 512-token context: prompt tokens + ``max_tokens`` over the context
is the one refusal (422 ``context_length_exceeded``) that depends on tokenization and so cannot
be written in a schema; ``test_api`` covers it. Generation is deterministic (Hypothesis
derandomized, no example database), so a run is the same run every time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.app.conftest import LiveServer

KEY = "schemathesis-key-0123456789"
# Worst case: 3 messages x 3 parts x 8 characters, 4 bytes each (the byte-level tokenizer's
# worst), plus the chat template, plus 16 new tokens: ~400 tokens, within 512.
LIMITS = {"max_prompt_chars": "8", "max_messages": "3", "max_content_parts": "3",
          "max_new_tokens_limit": "16", "default_max_new_tokens": "16",
          "max_stop_sequences": "2"}
MAX_EXAMPLES = 400  # per operation and phase; the parameterless GETs need only a few
MIN_CASES = 2000


def test_schemathesis_finds_no_failure(live_server: Callable[..., LiveServer],
                                       tmp_path: Path) -> None:
    server = live_server(api_keys=KEY, **LIMITS)
    operations = sum(len(ops) for ops in server.http.get("/openapi.json").json()["paths"]
                     .values())
    assert operations == 9
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
           "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
           "--generation-deterministic", "--workers", "1", "--no-color",
           "--header", f"Authorization: Bearer {KEY}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path,
                         check=False)
    out = run.stdout + run.stderr
    report = f"schemathesis exited {run.returncode}:\n{out[-8000:]}\nserver log:\n" + \
        server.output()[-3000:]
    assert run.returncode == 0, report
    assert "No issues found" in out, report
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested is not None and int(tested.group(1)) == operations, report
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases is not None, report
    generated, passed = map(int, cases.groups())
    assert generated == passed >= MIN_CASES, report
    assert "failed" not in out.split("Test cases:")[-1], report
