"""``greenroute show``: the built ladder's variants and measurements."""

from __future__ import annotations

import argparse
import sys

from cli.main import ladder_path
from models.runtime.manifest import Manifest


def run(args: argparse.Namespace) -> int:
    ladder = ladder_path(args)
    try:
        manifest = Manifest.load(ladder)
    except FileNotFoundError:
        print(f"greenroute show: error: no ladder in {ladder} (run greenroute build)",
              file=sys.stderr)
        return 2
    print(f"ladder {ladder}  runtime {manifest.runtime}  context {manifest.context_length}  "
          f"chat template {manifest.chat_template}")
    print(f"{'variant':<18}{'precision':<10}{'params':>12}{'MB':>8}{'ppl':>9}{'quality':>9}"
          f"{'top1':>7}{'tasks':>7}{'tok/s':>8}  method")
    for v in manifest.ordered():
        rate = v.calibration.decode_tokens_per_s if v.calibration else float("nan")
        tasks = "-" if v.task_score is None else f"{v.task_score:.2f}"
        print(f"{v.name:<18}{v.precision:<10}{v.parameters:>12,}{v.bytes / 1e6:>8.1f}"
              f"{v.perplexity:>9.2f}{v.quality:>9.3f}{v.top1_agreement:>7.3f}{tasks:>7}"
              f"{rate:>8.0f}  "
              f"{v.quantization or '-'}")
    return 0
