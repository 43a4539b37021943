"""``greenroute bench models``: decode tokens/s and time to first token for every variant, side by
side in one run with PyTorch ``generate``, optimum ``ORTModelForCausalLM.generate`` and
onnxruntime-genai's ``Generator`` loop on the same weights.

Each engine runs in its own subprocess (``python -m bench.models --worker ...``) so that torch's
and onnxruntime's thread pools never share a process; all use the same thread count, prompt,
greedy decoding, a warm-up, then the median of ``runs`` timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = (  # (numerator, denominator, minimum ratio) on batch-1 decode tokens/s
    ("ours:full", "optimum:full", 2.0),
    ("ours:int8", "ours:full", 2.2),
    ("ours:int4", "ours:full", 3.0),
    ("ours:distilled", "ours:full", 2.5),
)
PEER_MIN = 1.0  # ours / onnxruntime-genai's Generator, on every graph both run


def _prompt_ids(ladder: Path, prompt_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    from models.manifest import Manifest
    from models.pipeline.ladder import DEFAULT_HELDOUT

    tok = Tokenizer.from_file(str(ladder / Manifest.load(ladder).tokenizer))
    ids = tok.encode(DEFAULT_HELDOUT.read_text(encoding="utf-8")[:4000],
                     add_special_tokens=False).ids
    return list(ids[:prompt_tokens])


def _median_timing(fn_first: Callable[[], None], fn_all: Callable[[], None], runs: int,
                   new_tokens: int, batch: int) -> dict[str, float]:
    """TTFT = median time of a 1-token run; decode rate from the full runs minus that."""
    fn_first()
    fn_all()  # warm-up
    firsts, totals = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fn_first()
        firsts.append(time.perf_counter() - t)
        t = time.perf_counter()
        fn_all()
        totals.append(time.perf_counter() - t)
    ttft, total = statistics.median(firsts), statistics.median(totals)
    return {"ttft_ms": 1000 * ttft,
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(1e-9, total - ttft),
            "total_s": total}


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ladder = Path(args.ladder)
    prompt = _prompt_ids(ladder, args.prompt_tokens)
    kind, variant = args.worker.split(":")
    n, batch, runs = args.new_tokens, args.batch, args.runs
    prompts = [prompt] * batch
    if kind in ("ours", "ours-optimum-graph", "genai"):  # our engines, one timing path
        from models.engine.base import GenerationParams
        from models.ladder import load_ladder

        eng: Any
        if kind == "ours-optimum-graph":  # our loop on optimum's export of the same weights
            from tokenizers import Tokenizer

            from models.engine.ort import OrtEngine
            from models.manifest import Manifest

            m = Manifest.load(ladder)
            eng = OrtEngine(Path(args.optimum_dir) / "model.onnx",
                            Tokenizer.from_file(str(ladder / m.tokenizer)), m.context_length,
                            m.eos_token_ids, threads=args.threads)
        else:
            runtime = "onnxruntime" if kind == "ours" else "onnxruntime-genai"
            if kind == "ours":  # as `greenroute serve` runs it: one intra-op pool per process
                from models.engine.ort import use_global_thread_pool

                use_global_thread_pool(args.threads)
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


def _swap_pairs(jobs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``jobs`` with each ours:V@1 / genai:V pair in the other order."""
    out = list(jobs)
    for i in range(len(out) - 1):
        a, b = out[i][0], out[i + 1][0]
        if a.startswith("ours:") and b == "genai:" + a.split(":", 1)[1] and out[i][1] == 1:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def run_bench(ladder: Path, teacher: Path | None, runs: int = 5, new_tokens: int = 128,
              prompt_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
              threads: int = 2, baselines: bool = True, rounds: int = 3,
              long_prompt: int = 256) -> dict[str, Any]:
    """Run every engine × batch size in turn (one subprocess each); return all figures."""
    from models.manifest import Manifest

    manifest = Manifest.load(ladder)
    jobs: list[tuple[str, int]] = []
    for v in manifest.ordered():
        for b in batch_sizes:
            jobs.append((f"ours:{v.name}", b))
            if b == 1 and v.speculative is None:
                # the peer on every graph, next to ours so that a slow spell of the host falls
                # on both: onnxruntime-genai's Generator loop over the same files (its
                # speculative decoding is bench/genai_spec.py)
                jobs.append((f"genai:{v.name}", 1))
    # time to first token for a long prompt (prefill-bound), ours, batch 1
    jobs += [(f"ours-ttft{long_prompt}:{v.name}", 1) for v in manifest.ordered()]
    optimum_dir = ladder / "full"
    if baselines and manifest.variants["full"].exporter != "optimum":
        # optimum's baseline needs optimum's own export of the same weights
        if teacher is None:
            raise ValueError("the optimum baseline needs the teacher checkpoint")
        from models.pipeline.export import export_decoder

        optimum_dir = ladder / ".bench" / "optimum-full"
        if not (optimum_dir / "model.onnx").is_file():
            export_decoder(teacher, optimum_dir)
        jobs += [("ours-optimum-graph:full", 1)]
    if baselines:
        jobs += [("optimum:full", 1), ("torch:full", 1)]
        if 8 in batch_sizes:
            jobs += [("optimum:full", 8), ("torch:full", 8)]
    # Every round runs every engine once, so a slow spell of a shared host falls on all of them;
    # each engine's figure is its median over the rounds.
    per_round: dict[str, list[dict[str, Any]]] = {f"{n}@b{b}": [] for n, b in jobs}
    for round_ in range(rounds):
        # every other round runs the pairs the other way round: no engine always goes first
        order = jobs if round_ % 2 == 0 else _swap_pairs(jobs)
        for name, batch in order:
            worker, p_tok, n_tok = name, prompt_tokens, new_tokens
            if name.startswith("ours-ttft"):  # TTFT only: a long prompt, 2 new tokens
                worker, p_tok, n_tok = "ours:" + name.split(":")[1], long_prompt, 2
            cmd = [sys.executable, "-m", "bench.models", "--worker", worker, "--ladder",
                   str(ladder), "--runs", str(runs), "--new-tokens", str(n_tok), "--batch",
                   str(batch), "--prompt-tokens", str(p_tok), "--threads",
                   str(threads), "--optimum-dir", str(optimum_dir)]
            if teacher is not None:
                cmd += ["--checkpoint", str(teacher)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            key = f"{name}@b{batch}"
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                per_round[key].append({"error": tail[0]})
            else:
                per_round[key].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}: {key}: {per_round[key][-1]}", file=sys.stderr)
    results: dict[str, Any] = {}
    for key, rows in per_round.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            results[key] = rows[-1]
            continue
        results[key] = {m: statistics.median(r[m] for r in good)
                        for m in ("ttft_ms", "decode_tokens_per_s", "total_s")}
        results[key]["rounds_tokens_per_s"] = [r["decode_tokens_per_s"] for r in good]
    return {"host": manifest.host, "runs": runs, "rounds": rounds, "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens, "long_prompt": long_prompt, "threads": threads,
            "variants": [v.name for v in manifest.ordered()], "results": results}


def report(figures: dict[str, Any]) -> str:
    """A plain-text table plus the target ratios."""
    res = figures["results"]
    lines = [f"decode tokens/s and TTFT, prompt {figures['prompt_tokens']} tokens, "
             f"{figures['new_tokens']} new tokens, greedy, median of {figures['runs']} runs "
             f"per round, median of {figures.get('rounds', 1)} rounds (every engine once per "
             f"round), {figures['threads']} threads",
             f"{'engine':<28}{'batch':>6}{'tok/s':>10}{'TTFT ms':>10}"]
    for key, r in res.items():
        name, batch = key.rsplit("@b", 1)
        if "error" in r:
            lines.append(f"{name:<28}{batch:>6}  error: {r['error']}")
        elif name.startswith("ours-ttft"):
            lines.append(f"{name:<28}{batch:>6}{'':>10}{r['ttft_ms']:>10.1f}")
        else:
            lines.append(f"{name:<28}{batch:>6}{r['decode_tokens_per_s']:>10.0f}"
                         f"{r['ttft_ms']:>10.1f}")
    lines.append("targets (batch 1 decode tokens/s ratios of the medians; per round in [ ]):")
    peers = [(f"ours:{v}", f"genai:{v}", PEER_MIN) for v in figures.get("variants", [])]
    for num, den, minimum in (*peers, *TARGETS):
        a, b = res.get(f"{num}@b1", {}), res.get(f"{den}@b1", {})
        if "decode_tokens_per_s" in a and "decode_tokens_per_s" in b:
            ratio = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            verdict = "met" if ratio >= minimum else "MISSED"
            rounds = ", ".join(f"{x / y:.2f}" for x, y in zip(
                a.get("rounds_tokens_per_s", []), b.get("rounds_tokens_per_s", []),
                strict=False))
            lines.append(f"  {num} / {den} = {ratio:.2f}x [{rounds}] (target >= {minimum}x): "
                         f"{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models")
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
