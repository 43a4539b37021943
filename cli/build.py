"""``greenroute build``: the ladder, through the build pipeline (torch, optimum)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.build.errors import BuildError
from models.build.pipeline.build import BuildOptions, build_ladder
from models.build.pipeline.export import default_genai_builder
from models.runtime.manifest import default_ladder_dir


def options(args: argparse.Namespace) -> BuildOptions:
    """The parser's arguments with the pipeline's defaults filled in."""
    model = args.model or BuildOptions.model
    if args.distill_layers is not None or args.no_student:
        student = None
    elif args.student is not None:
        student = args.student
    else:  # the shipped student belongs to the default teacher only
        student = BuildOptions.student if model == BuildOptions.model else None
    return BuildOptions(
        model=model,
        student=student,
        distill_layers=args.distill_layers,
        distill_steps=(args.distill_steps if args.distill_steps is not None
                       else BuildOptions.distill_steps),
        corpus=args.corpus,
        out=Path(args.out) if args.out else default_ladder_dir(),
        threads=args.threads,
        force=args.force,
        race=args.race,
        speculative=not args.no_speculative,
        genai_builder=args.genai_builder or default_genai_builder(),
    )


def run(args: argparse.Namespace) -> int:
    try:
        manifest, _ = build_ladder(options(args), log=lambda m: print(m, file=sys.stderr))
    except BuildError as err:
        print(f"greenroute build: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0
