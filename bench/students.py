"""``greenroute bench students``: the Pareto of the pruned-student candidates against the
ladder's rungs: task score and top-1 agreement with ``full`` against decode tokens/s at batch 1
and batch 8, every engine timed taking turns in one run (order rotating every round).

Each candidate a ``greenroute train`` run left (``<work>/candidates/<name>``: its own tensors
and record) is rebuilt on the teacher, exported to fp32 ONNX and quantized with the ladder's
``int8`` method, then scored exactly as the build scores a rung: held-out perplexity and
agreement on the same tokens, greedy answers to the same task set. The ladder's rungs take
their scores from its manifest (the build measured them the same way) and are timed here.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.slots import Sampler, slots_for

RUNGS = ("full", "int8", "int4", "distilled", "distilled-int8")


def decode_rate(engine: Engine, prompt: list[int], rows: int, tokens: int) -> tuple[float, str]:
    """Decode tokens/s of ``rows`` rows stepping together (the prefill is not timed), and the
    kind of slots that stepped them (``serial``: one row after another, not batched)."""
    sampler = Sampler(GenerationParams(max_new_tokens=tokens + 1, ignore_eos=True))
    slots = slots_for(engine, rows, len(prompt) + tokens + 1)
    last = [slots.prefill(r, prompt, sampler) for r in range(rows)]
    order = list(range(rows))
    start = time.perf_counter()
    for _ in range(tokens):
        last = slots.step(order, last, [sampler] * rows)
    seconds = time.perf_counter() - start
    for r in order:
        slots.release(r)
    return rows * tokens / seconds, slots.kind


def _candidates(ladder: Path, work: Path, teacher: Path, out: Path,
                log: Any) -> dict[str, dict[str, Any]]:
    """Export, quantize and score every candidate under ``work/candidates`` (none when that
    directory does not exist: the bench then times the ladder's rungs only)."""
    import json

    from tokenizers import Tokenizer

    from models.build.pipeline import quantize as q
    from models.build.pipeline.export import ONNX_FILE, default_genai_builder
    from models.build.pipeline.genai_config import adapt_builder_genai_config
    from models.build.pipeline.options import BuildOptions
    from models.build.pipeline.quality import agreement, evaluate, heldout_ids
    from models.build.pipeline.tasks import load_tasks, task_score
    from models.build.pipeline.verify import export_verified
    from models.build.train.student import STUDENT_META, assemble_student
    from models.runtime.chat import ChatTemplate
    from models.runtime.engine.ort import OrtEngine
    from models.runtime.manifest import Manifest

    if not (work / "candidates").is_dir():
        log(f"no training candidates under {work}: timing the ladder's rungs only")
        return {}
    manifest = Manifest.load(ladder)
    tokenizer = Tokenizer.from_file(str(ladder / manifest.tokenizer))
    opts = BuildOptions()
    held = heldout_ids(tokenizer, opts.heldout, opts.eval_tokens)
    template, tasks = ChatTemplate.for_directory(ladder), load_tasks()

    def engine_for(vdir: Path) -> OrtEngine:
        return OrtEngine(vdir / ONNX_FILE, tokenizer, manifest.context_length,
                         manifest.eos_token_ids, threads=opts.threads)

    full = evaluate(engine_for(ladder / "full"), held, opts.eval_window)
    int8 = manifest.variants["int8"].quantization
    method = next(m for m in q.candidates_8bit() if m.name == int8)
    found: dict[str, dict[str, Any]] = {}
    for cdir in sorted(p for p in (work / "candidates").iterdir() if p.is_dir()):
        record = json.loads((cdir / STUDENT_META).read_text())
        ckpt = assemble_student(teacher, cdir, out / cdir.name / "checkpoint")
        log(f"exporting {cdir.name}")
        _, fp32 = export_verified(ckpt, out / cdir.name / "fp32", engine_for, held, opts.opset,
                                  default_genai_builder(), log)
        q.quantize(out / cdir.name / "fp32", out / cdir.name / "int8", method)
        # as the build's runtime stage does: the copy's genai_config says its KV buffer is
        # shared, so it batches like the ladder's rungs
        adapt_builder_genai_config(out / cdir.name / "int8", out / cdir.name / "fp32",
                                   ONNX_FILE, opts.threads)
        for suffix, engine in (("", fp32), ("-int8", engine_for(out / cdir.name / "int8"))):
            rep = evaluate(engine, held, opts.eval_window)
            score = task_score(engine, template, tasks)
            found[cdir.name + suffix] = {
                "engine": engine, "layers": record["layers"],
                "quality": full.perplexity / rep.perplexity,
                "agreement": agreement(rep, full), "tasks": score.correct,
                "task_count": score.total, "scored": "here"}
            log(f"  {cdir.name + suffix}: quality {found[cdir.name + suffix]['quality']:.3f}, "
                f"tasks {score.correct}/{score.total}")
    return found


def run_bench(ladder: Path, work: Path, teacher: Path, out: Path, rounds: int = 5,
              tokens: int = 32, threads: int = 2, log: Any = print) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from models.runtime.ladder import load_engine
    from models.runtime.manifest import Manifest

    manifest = Manifest.load(ladder)
    tokenizer = Tokenizer.from_file(str(ladder / manifest.tokenizer))
    entries: dict[str, dict[str, Any]] = {}
    for name in RUNGS:
        v = manifest.variants.get(name)
        if v is None:
            continue
        entries[name] = {
            "engine": load_engine(ladder, manifest, v, tokenizer, "onnxruntime", "cpu", threads),
            "layers": None, "quality": v.quality, "agreement": v.top1_agreement,
            "tasks": round((v.task_score or 0.0) * (manifest.tasks or {}).get("count", 0)),
            "task_count": (manifest.tasks or {}).get("count", 0), "scored": "manifest"}
    entries.update(_candidates(ladder, work, teacher, out, log))
    prompt = tokenizer.encode("The json module provides functions to encode and").ids
    names = list(entries)
    rates: dict[str, dict[int, list[float]]] = {n: {1: [], 8: []} for n in names}
    for r in range(rounds + 1):  # round 0 warms every engine up and is not counted
        turn = names[r % len(names):] + names[: r % len(names)]
        for name in turn:
            for rows in (1, 8):
                rate, kind = decode_rate(entries[name]["engine"], prompt, rows, tokens)
                entries[name]["slots"] = kind
                if r:
                    rates[name][rows].append(rate)
        log(f"round {r}/{rounds} done")
    figures: dict[str, Any] = {"rounds": rounds, "tokens": tokens, "threads": threads,
                               "variants": {}}
    for name in names:
        e = {k: v for k, v in entries[name].items() if k != "engine"}
        e["tok_s_batch1"] = statistics.median(rates[name][1])
        e["tok_s_batch8"] = statistics.median(rates[name][8])
        figures["variants"][name] = e
    full = figures["variants"]["full"]
    for e in figures["variants"].values():
        e["speed_vs_full_batch1"] = e["tok_s_batch1"] / full["tok_s_batch1"]
        e["speed_vs_full_batch8"] = e["tok_s_batch8"] / full["tok_s_batch8"]
    return figures


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated (another at least as fast and as good, and better in one)."""
    return [n for n, (x, y) in points.items()
            if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y)
                       for m, (x2, y2) in points.items() if m != n)]


def report(f: dict[str, Any]) -> str:
    lines = [f"decode tok/s, {f['tokens']} tokens after the prompt, median of {f['rounds']} "
             f"rounds taking turns ({f['threads']} threads); * = on the task-score Pareto front "
             "at batch 1",
             f"{'variant':<20}{'blocks':>7}{'quality':>9}{'agree':>7}{'tasks':>7}"
             f"{'tok/s b1':>10}{'x full':>8}{'tok/s b8':>10}{'x full':>8}  slots"]
    front = set(pareto({n: (v["tok_s_batch1"], v["tasks"]) for n, v in f["variants"].items()}))
    for name, v in f["variants"].items():
        lines.append(
            f"{name + (' *' if name in front else ''):<20}{v['layers'] or '':>7}"
            f"{v['quality']:>9.3f}{v['agreement']:>7.3f}{v['tasks']:>4}/{v['task_count']:<2}"
            f"{v['tok_s_batch1']:>10.1f}{v['speed_vs_full_batch1']:>8.2f}"
            f"{v['tok_s_batch8']:>10.1f}{v['speed_vs_full_batch8']:>8.2f}  {v.get('slots', '')}")
    return "\n".join(lines)


LABEL_LINE = 13.0  # px between label baselines (font-size 11)


def _label_width(text: str) -> float:
    return 6.2 * len(text)  # px, sans-serif at 11 px: a generous average


def svg(f: dict[str, Any]) -> str:
    """Two panels (batch 1, batch 8): task score against decode tok/s, the front joined."""
    w, h, pad = 420, 300, 56
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" '
             'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" '
             'fill="white"/>']
    for panel, key in enumerate(("tok_s_batch1", "tok_s_batch8")):
        pts = {n: (v[key], float(v["tasks"])) for n, v in f["variants"].items()}
        xmax = max(x for x, _ in pts.values()) * 1.3  # room for the rightmost label
        ymax = max(max(y for _, y in pts.values()), 1.0) * 1.15
        ox = panel * w

        def at(x: float, y: float, ox: int = ox, xmax: float = xmax,
               ymax: float = ymax) -> tuple[float, float]:
            return (ox + pad + x / xmax * (w - 1.5 * pad), h - pad - y / ymax * (h - 1.8 * pad))

        x0, y0 = at(0, 0)
        x1, y1 = at(xmax, ymax)
        parts.append(f'<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>')
        for i in range(5):  # tick labels: a quarter of each axis apart
            tx, _ = at(xmax * i / 4, 0)
            _, ty = at(0, ymax * i / 4)
            parts.append(f'<text x="{tx:.1f}" y="{y0 + 14:.1f}" text-anchor="middle">'
                         f'{xmax * i / 4:.0f}</text>')
            parts.append(f'<text x="{x0 - 4:.1f}" y="{ty + 4:.1f}" text-anchor="end">'
                         f'{ymax * i / 4:.0f}</text>')
        parts.append(f'<text x="{(x0 + x1) / 2}" y="{h - 12}" text-anchor="middle">decode '
                     f'tok/s at batch {1 if panel == 0 else 8}</text>')
        parts.append(f'<text x="{x0 - 34}" y="{(y0 + y1) / 2}" transform="rotate(-90 {x0 - 34},'
                     f'{(y0 + y1) / 2})" text-anchor="middle">task score (of 60)</text>')
        front = sorted(pareto(pts), key=lambda n: pts[n][0])
        line = " ".join(f"{at(*pts[n])[0]:.1f},{at(*pts[n])[1]:.1f}" for n in front)
        parts.append(f'<polyline points="{line}" stroke="#2a7" fill="none" '
                     'stroke-dasharray="4 3"/>')
        placed: list[tuple[float, float, float]] = []  # labels so far: x, baseline, width
        for n, (x, y) in pts.items():
            cx, cy = at(x, y)
            colour = "#c33" if f["variants"][n]["scored"] == "here" else "#236"
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}"/>')
            tx, ty, tw = cx + 6, cy - 5, _label_width(n)
            while any(abs(ty - py) < LABEL_LINE and tx < px + pw and px < tx + tw
                      for px, py, pw in placed):  # two points at one place: the next line down
                ty += LABEL_LINE
            placed.append((tx, ty, tw))
            parts.append(f'<text x="{tx:.1f}" y="{ty:.1f}">{n}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
