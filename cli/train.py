"""``greenroute train``: train a model (or distil a student) from a TOML config (torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.build.train.train import train


def run(args: argparse.Namespace) -> int:
    summary = train(Path(args.config), Path(args.checkpoint_dir), threads=args.threads,
                    until=args.until)
    print(json.dumps(summary, indent=2))
    return 0
