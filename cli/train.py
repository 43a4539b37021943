"""``greenroute train``: train a model (or distil a student) from a TOML config (torch).

A config with ``kind = "prune"`` makes pruned students of ``--teacher`` (default: the default
model), heals and measures them and writes the best to ``--out``
(:mod:`models.build.train.students`); any other config is a training run
(:mod:`models.build.train.train`)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    config = tomllib.loads(Path(args.config).read_text())
    if config.get("kind") == "prune":
        from models.build.pipeline.options import DEFAULT_STUDENT, DEFAULT_TEACHER
        from models.build.pipeline.source import resolve_checkpoint
        from models.build.train.students import build_students

        teacher = resolve_checkpoint(args.teacher or DEFAULT_TEACHER)
        summary = build_students(teacher, config, Path(args.checkpoint_dir),
                                 Path(args.out or DEFAULT_STUDENT), threads=args.threads,
                                 log=lambda m: print(m, flush=True))
        summary = {k: v for k, v in summary.items() if k not in ("curve", "config", "rule")}
    else:
        from models.build.train.train import train

        summary = train(Path(args.config), Path(args.checkpoint_dir), threads=args.threads,
                        until=args.until)
    print(json.dumps(summary, indent=2))
    return 0
