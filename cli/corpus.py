"""``greenroute corpus``: the default training corpus from python3.11-doc sources."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.build.train.corpus import write_corpus


def run(args: argparse.Namespace) -> int:
    train_bytes, held_bytes = write_corpus(Path(args.sources), Path(args.train_out),
                                           Path(args.heldout_out))
    print(f"train: {args.train_out} ({train_bytes} bytes); heldout: {args.heldout_out} "
          f"({held_bytes} bytes)")
    return 0
