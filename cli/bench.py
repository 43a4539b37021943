"""``greenroute bench models|serve|route|energy``: the only importer of ``bench/``; each suite
is imported when it runs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.main import ladder_path


def _emit(figures: dict[str, Any], report: Callable[[dict[str, Any]], str],
          json_path: str | None) -> int:
    """Print a benchmark's report under the machine it ran on (CPU model, the ISA flags that
    pick kernels, onnxruntime's version); also write its figures, with the machine, as JSON
    when asked."""
    import onnxruntime

    from models.runtime.host import cpu_name, isa_flags, isa_summary

    figures.setdefault("host", {"cpu": cpu_name(), "isa_flags": isa_flags(),
                                "onnxruntime": onnxruntime.__version__})
    print(f"host: {isa_summary()}, onnxruntime {onnxruntime.__version__}")
    print(report(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _models(args: argparse.Namespace) -> int:
    from bench.models import report, run_bench
    from models.build.pipeline.options import DEFAULT_TEACHER
    from models.build.pipeline.source import resolve_checkpoint

    teacher = resolve_checkpoint(args.teacher or DEFAULT_TEACHER)
    figures = run_bench(ladder_path(args), teacher,
                        runs=args.runs, new_tokens=args.new_tokens,
                        prompt_tokens=args.prompt_tokens,
                        batch_sizes=tuple(int(b) for b in args.batch.split(",")),
                        threads=args.threads, baselines=not args.no_baselines,
                        rounds=args.rounds)
    return _emit(figures, report, args.json)


def _serve(args: argparse.Namespace) -> int:
    from bench.serve import report, run_bench

    figures = run_bench(ladder_path(args), variant=args.variant, new_tokens=args.new_tokens,
                        repeats=args.repeats, threads=args.threads)
    return _emit(figures, report, args.json)


def _route(args: argparse.Namespace) -> int:
    from bench.route import WORKLOAD, report, report_scaling, run_bench, run_scaling

    if args.scaling:
        return _emit(run_scaling(ladder_path(args), threads=args.threads), report_scaling,
                     args.json)
    figures = run_bench(ladder_path(args), Path(args.workload) if args.workload else WORKLOAD,
                        threads=args.threads,
                        clients=tuple(int(c) for c in args.clients.split(",")),
                        requests=args.requests, rounds=args.rounds)
    return _emit(figures, report, args.json)


def _soak(args: argparse.Namespace) -> int:
    from bench.soak import report, run_soak

    return _emit(run_soak(ladder_path(args), duration_s=args.duration, clients=args.clients,
                          threads=args.threads, warmup_s=args.warmup), report, args.json)


def _peers(args: argparse.Namespace) -> int:
    from bench.peers import report, run_bench

    figures = run_bench(ladder_path(args), clients=tuple(int(c) for c in args.clients.split(",")),
                        rounds=args.rounds, new_tokens=args.new_tokens, threads=args.threads,
                        variant_threads=args.variant_threads, server=args.server,
                        served=args.served)
    return _emit(figures, report, args.json)


def _students(args: argparse.Namespace) -> int:
    from bench.students import report, run_bench, svg
    from models.build.pipeline.options import DEFAULT_TEACHER
    from models.build.pipeline.source import resolve_checkpoint

    work = Path(args.work)
    teacher = resolve_checkpoint(args.teacher or DEFAULT_TEACHER)
    figures = run_bench(ladder_path(args), work, teacher,
                        Path(args.out) if args.out else work / "onnx", rounds=args.rounds,
                        tokens=args.tokens, threads=args.threads)
    if args.svg:
        Path(args.svg).write_text(svg(figures))
    return _emit(figures, report, args.json)


def _spec(args: argparse.Namespace) -> int:
    if args.riders:
        from bench.spec_mixed import report_mixed, run_mixed

        return _emit(run_mixed(ladder_path(args), rows=args.rows, riders=args.riders,
                               draft=args.draft, k=args.k, new_tokens=args.new_tokens,
                               rounds=args.rounds, threads=args.threads), report_mixed,
                     args.json)
    if args.rows > 1:
        from bench.spec_rows import report_rows, run_rows

        return _emit(run_rows(ladder_path(args), rows=args.rows, draft=args.draft, k=args.k,
                              new_tokens=args.new_tokens, rounds=args.rounds,
                              threads=args.threads), report_rows, args.json)
    from bench.spec import report, run_bench

    figures = run_bench(ladder_path(args), draft=args.draft, k=args.k,
                        new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads)
    return _emit(figures, report, args.json)


def _gpu_check(args: argparse.Namespace) -> int:
    from bench.gpu_check import report, run_check

    ladder = Path(args.ladder) if args.ladder else None
    figures = run_check(ladder, Path(args.out), device=args.device, threads=args.threads,
                        requests=args.requests)
    _emit(figures, report, args.json)
    return 0 if figures["ok"] else 1


def _threads(args: argparse.Namespace) -> int:
    from bench.threads import report, run_bench

    figures = run_bench(ladder_path(args), threads=args.threads, new_tokens=args.new_tokens,
                        rounds=args.rounds)
    return _emit(figures, report, args.json)


def _energy(args: argparse.Namespace) -> int:
    from bench.energy import report, run_bench

    figures = run_bench(ladder_path(args), threads=args.threads, gpu_runs=args.gpu_runs)
    return _emit(figures, report, args.json)


def _kernels(args: argparse.Namespace) -> int:
    from bench.kernels import report, run_bench

    figures = run_bench(k=args.k, n=args.n, rows=tuple(int(m) for m in args.rows.split(",")),
                        rounds=args.rounds, threads=args.threads)
    return _emit(figures, report, args.json)


SUITES: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": _models, "serve": _serve, "route": _route, "spec": _spec, "energy": _energy,
    "gpu-check": _gpu_check,
    "soak": _soak, "peers": _peers, "threads": _threads,
    "students": _students, "kernels": _kernels}


def run(args: argparse.Namespace) -> int:
    return SUITES[args.suite](args)
