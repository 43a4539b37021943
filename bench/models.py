"""``greenroute bench models``: decode tokens/s and time to first token for every variant, side by
side in one run with PyTorch ``generate``, optimum ``ORTModelForCausalLM.generate`` and
onnxruntime-genai's ``Generator`` loop on the same weights.

Each engine runs in its own subprocess (``python -m bench.models_worker --worker ...``,
:mod:`bench.models_worker`) so that torch's
and onnxruntime's thread pools never share a process; all use the same thread count, prompt,
greedy decoding, a warm-up, then the median of ``runs`` timed runs.

Ours against onnxruntime-genai is measured *paired*: one subprocess per graph loads both (two
separate onnxruntime instances: ours is the Python binding's, genai links its own library) and
alternates their runs, so that each pair of runs shares the host's spell of noise (on the
shared 2-core machine this was written on, separate subprocesses minutes apart moved the ratio
between 0.72 and 1.2 on one graph). The figure is the median of the per-pair ratios. Both get
a pool of ``threads`` of their own; ours with the service's policy for such a pool (see
:func:`models.runtime.engine.ort.session_options`).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

TARGETS = (  # (numerator, denominator, minimum ratio) on batch-1 decode tokens/s
    ("ours:full", "optimum:full", 2.0),
    ("ours:int8", "ours:full", 2.2),
    ("ours:int4", "ours:full", 3.0),
    ("ours:distilled", "ours:full", 2.5),
)
PEER_MIN = 1.0  # ours / onnxruntime-genai's Generator, on every graph both run


def run_bench(ladder: Path, teacher: Path | None, runs: int = 5, new_tokens: int = 128,
              prompt_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
              threads: int = 2, baselines: bool = True, rounds: int = 3,
              long_prompt: int = 256) -> dict[str, Any]:
    """Run every engine × batch size in turn (one subprocess each); return all figures."""
    from models.runtime.manifest import Manifest

    manifest = Manifest.load(ladder)
    jobs: list[tuple[str, int]] = []
    for v in manifest.ordered():
        for b in batch_sizes:
            if b == 1 and v.speculative is None:
                # the peer on every graph, paired run by run with ours in one process:
                # onnxruntime-genai's Generator loop over the same files (its speculative
                # decoding is bench/genai_spec.py)
                jobs.append((f"peer:{v.name}", 1))
            else:
                jobs.append((f"ours:{v.name}", b))
    # time to first token for a long prompt (prefill-bound), ours, batch 1
    jobs += [(f"ours-ttft{long_prompt}:{v.name}", 1) for v in manifest.ordered()]
    optimum_dir = ladder / "full"
    if baselines and manifest.variants["full"].exporter != "optimum":
        # optimum's baseline needs optimum's own export of the same weights
        if teacher is None:
            raise ValueError("the optimum baseline needs the teacher checkpoint")
        from models.build.pipeline.export import export_decoder

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
    per_round: dict[str, list[dict[str, Any]]] = {}
    for name, b in jobs:
        if name.startswith("peer:"):
            graph = name.split(":", 1)[1]
            per_round.update({f"ours:{graph}@b1": [], f"genai:{graph}@b1": []})
        else:
            per_round[f"{name}@b{b}"] = []
    pair_ratios: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for name, batch in jobs:
            worker, p_tok, n_tok = name, prompt_tokens, new_tokens
            if name.startswith("ours-ttft"):  # TTFT only: a long prompt, 2 new tokens
                worker, p_tok, n_tok = "ours:" + name.split(":")[1], long_prompt, 2
            cmd = [sys.executable, "-m", "bench.models_worker", "--worker", worker, "--ladder",
                   str(ladder), "--runs", str(runs), "--new-tokens", str(n_tok), "--batch",
                   str(batch), "--prompt-tokens", str(p_tok), "--threads",
                   str(threads), "--optimum-dir", str(optimum_dir)]
            if teacher is not None:
                cmd += ["--checkpoint", str(teacher)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                out: dict[str, Any] = {"error": tail[0]}
            else:
                out = json.loads(proc.stdout.strip().splitlines()[-1])
            if name.startswith("peer:"):
                graph = name.split(":", 1)[1]
                pair_ratios.setdefault(graph, []).extend(out.get("pair_ratios", []))
                for engine, runtime in (("ours", "onnxruntime"), ("genai", "onnxruntime-genai")):
                    per_round[f"{engine}:{graph}@b1"].append(out.get(runtime, out))
                print(f"  round {round_ + 1}: {name}: pair ratios "
                      f"{[round(r, 3) for r in out.get('pair_ratios', [])]}", file=sys.stderr)
            else:
                key = f"{name}@b{batch}"
                per_round[key].append(out)
                print(f"  round {round_ + 1}: {key}: {out}", file=sys.stderr)
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
            "variants": [v.name for v in manifest.ordered()], "results": results,
            "peer_pair_ratios": pair_ratios}


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the median (percentile method, seeded: a report reads the same
    every time it is printed from the same figures)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return medians[tail], medians[resamples - 1 - tail]


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
    lines.append("ours / onnxruntime-genai's Generator, same graph, batch 1 decode: median "
                 "of the per-pair ratios [quartiles] (pairs), 95 % bootstrap interval of "
                 "that median")
    for v, ratios in figures.get("peer_pair_ratios", {}).items():
        if len(ratios) < 2:
            continue
        mid = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        lo, hi = median_interval(ratios)
        if mid >= PEER_MIN:
            verdict = "met"
        elif hi >= PEER_MIN:  # the pairs cannot tell this graph from parity
            verdict = f"MISSED, within noise (the interval reaches {PEER_MIN})"
        else:
            verdict = "MISSED, behind (the whole interval is below the target)"
        lines.append(f"  ours:{v} / genai:{v} = {mid:.3f}x [{q1:.2f}-{q3:.2f}] "
                     f"({len(ratios)}), interval {lo:.3f}-{hi:.3f} (target >= {PEER_MIN}x): "
                     f"{verdict}")
    lines.append("targets (batch 1 decode tokens/s ratios of the medians; per round in [ ]):")
    for num, den, minimum in TARGETS:
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
