#!/usr/bin/env bash
# Print a python that has the official `openai` client, for the image and compose checks:
# $SMOKE_PYTHON when set, else a venv kept under ~/.cache/greenroute (made on first use, with
# pyproject.toml's openai pin).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${SMOKE_PYTHON:-}" ]; then echo "$SMOKE_PYTHON"; exit 0; fi
venv=${XDG_CACHE_HOME:-$HOME/.cache}/greenroute/smoke-venv
openai_pin=$(grep -o '"openai==[^"]*"' pyproject.toml | tr -d '"')
if ! "$venv/bin/python" -c "import openai" 2> /dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "$openai_pin" 2> >(grep -v '^WARNING: Location' >&2) >&2
fi
echo "$venv/bin/python"
