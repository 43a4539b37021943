"""One engine of ``greenroute bench models`` in a process of its own (``python -m
bench.models_worker --worker ENGINE ...``, started by :func:`bench.models.run_bench`): a
warm-up, then the median of ``runs`` timed runs; ours and onnxruntime-genai's ``Generator``
paired run by run on the same graph. Prints its figures as one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# pause before each timed run of a pair: the other engine's pool threads may still be spinning
# from its last run (genai's spin between runs), and would take a core from this one
SETTLE_S = 0.05


def _prompt_ids(ladder: Path, prompt_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    from models.build.pipeline.options import DEFAULT_HELDOUT
    from models.runtime.manifest import Manifest

    tok = Tokenizer.from_file(str(ladder / Manifest.load(ladder).tokenizer))
    ids = tok.encode(DEFAULT_HELDOUT.read_text(encoding="utf-8")[:4000],
                     add_special_tokens=False).ids
    return list(ids[:prompt_tokens])


def _timed(fn_first: Callable[[], None], fn_all: Callable[[], None],
           settle_s: float = 0.0) -> tuple[float, float]:
    """Seconds of one 1-token run and of one full run, each after ``settle_s`` of rest."""
    time.sleep(settle_s)
    t = time.perf_counter()
    fn_first()
    first = time.perf_counter() - t
    time.sleep(settle_s)
    t = time.perf_counter()
    fn_all()
    return first, time.perf_counter() - t


def _median_timing(fn_first: Callable[[], None], fn_all: Callable[[], None], runs: int,
                   new_tokens: int, batch: int) -> dict[str, float]:
    """TTFT = median time of a 1-token run; decode rate from the full runs minus that."""
    fn_first()
    fn_all()  # warm-up
    firsts, totals = [], []
    for _ in range(runs):
        first, total = _timed(fn_first, fn_all)
        firsts.append(first)
        totals.append(total)
    ttft, total = statistics.median(firsts), statistics.median(totals)
    return {"ttft_ms": 1000 * ttft,
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(1e-9, total - ttft),
            "total_s": total}


def _paired_timing(engines: dict[str, Any], prompt: list[int], runs: int,
                   new_tokens: int) -> dict[str, Any]:
    """Batch-1 timing of two engines taking turns run by run (the order alternates); per
    engine the medians, plus each run's decode-rate ratio of the first engine to the second."""
    from models.runtime.engine.base import GenerationParams

    one = GenerationParams(max_new_tokens=1, ignore_eos=True)
    full = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    names = list(engines)
    for eng in engines.values():  # warm-up
        eng.generate(prompt, one)
        eng.generate(prompt, full)
    firsts: dict[str, list[float]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            eng = engines[name]
            first, total = _timed(partial(eng.generate, prompt, one),
                                  partial(eng.generate, prompt, full), SETTLE_S)
            firsts[name].append(first)
            totals[name].append(total)
            rates[name].append((new_tokens - 1) / max(1e-9, total - first))
    out: dict[str, Any] = {
        name: {"ttft_ms": 1000 * statistics.median(firsts[name]),
               "decode_tokens_per_s": statistics.median(rates[name]),
               "total_s": statistics.median(totals[name])} for name in names}
    a, b = names[0], names[1]
    out["pair_ratios"] = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
    return out


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ladder = Path(args.ladder)
    prompt = _prompt_ids(ladder, args.prompt_tokens)
    kind, variant = args.worker.split(":")
    n, batch, runs = args.new_tokens, args.batch, args.runs
    prompts = [prompt] * batch
    if kind == "peer":  # ours and onnxruntime-genai's Generator on one graph, paired
        from models.runtime.ladder import load_ladder

        pair = {runtime: load_ladder(ladder, threads=args.threads, runtime=runtime,
                                     only=[variant]).engines[variant]
                for runtime in ("onnxruntime", "onnxruntime-genai")}
        return _paired_timing(pair, prompt, runs, n)
    if kind in ("ours", "ours-optimum-graph", "genai"):  # our engines, one timing path
        from models.runtime.engine.base import GenerationParams
        from models.runtime.ladder import load_ladder

        eng: Any
        if kind == "ours-optimum-graph":  # our loop on optimum's export of the same weights
            from tokenizers import Tokenizer

            from models.runtime.engine.ort import OrtEngine
            from models.runtime.manifest import Manifest

            m = Manifest.load(ladder)
            eng = OrtEngine(Path(args.optimum_dir) / "model.onnx",
                            Tokenizer.from_file(str(ladder / m.tokenizer)), m.context_length,
                            m.eos_token_ids, threads=args.threads)
        else:
            runtime = "onnxruntime" if kind == "ours" else "onnxruntime-genai"
            eng = load_ladder(ladder, threads=args.threads, runtime=runtime,
                              only=[variant]).engines[variant]
        one = GenerationParams(max_new_tokens=1, ignore_eos=True)
        full = GenerationParams(max_new_tokens=n, ignore_eos=True)
        if batch == 1:
            return _median_timing(lambda: eng.generate(prompt, one),
                                  lambda: eng.generate(prompt, full), runs, n, 1)
        return _median_timing(lambda: eng.generate_batch(prompts, one),
                              lambda: eng.generate_batch(prompts, full), runs, n, batch)
    import torch

    torch.set_num_threads(args.threads)
    ids = torch.tensor(prompts)
    if kind == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        model: Any = ORTModelForCausalLM.from_pretrained(args.optimum_dir, use_cache=True,
                                                         session_options=so)
    else:  # torch: the source checkpoint of that variant
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()

    def gen(k: int) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    return _median_timing(lambda: gen(1), lambda: gen(n), runs, n, batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models_worker")
    p.add_argument("--worker", required=True)
    p.add_argument("--ladder", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--optimum-dir", default=None, help="optimum's export of full")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(_worker(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
