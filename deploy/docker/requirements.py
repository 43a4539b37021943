"""Print pip requirements for the Docker build from pyproject.toml, one per line.

The pins live in pyproject.toml only; this adds the optional extra (``--extra build``) and, for
the GPU image (``--gpu``), swaps onnxruntime and onnxruntime-genai for their CUDA builds, which
install the same Python modules (``--ort-gpu`` / ``--genai-gpu`` give those pins).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """``onnxruntime-genai==0.18.0`` → ``onnxruntime-genai`` (normalized, extras dropped)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(pyproject: Path, extra: str | None = None, gpu: bool = False,
                 ort_gpu: str = "", genai_gpu: str = "") -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    if extra:
        reqs += project["optional-dependencies"][extra]
    if not gpu:
        return reqs
    swap = {"onnxruntime": ort_gpu, "onnxruntime-genai": genai_gpu}
    missing = [name for name, pin in swap.items() if not pin]
    if missing:
        raise ValueError(f"--gpu needs pins for {', '.join(missing)}")
    found = {requirement_name(r) for r in reqs} & swap.keys()
    if found != swap.keys():
        raise ValueError(f"pyproject.toml no longer depends on {sorted(swap.keys() - found)}")
    return [swap.get(requirement_name(r), r) for r in reqs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--extra", default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--ort-gpu", default="")
    parser.add_argument("--genai-gpu", default="")
    args = parser.parse_args(argv)
    try:
        lines = requirements(Path(args.pyproject), args.extra, args.gpu, args.ort_gpu,
                             args.genai_gpu)
    except ValueError as err:
        print(f"requirements.py: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
