"""``greenroute bench spec``: the speculative rung against ``full``, side by side.

Greedy, ``new_tokens`` per prompt, batch 1, EOS ignored, chat-rendered prompts; every round
runs ``full`` and the speculative rung (draft and k from the manifest, or as given) on every
prompt, taking turns, after a warm-up. Reported: decode tokens/s (after the first token) and
joules per generated token of each (the service's meter: RAPL, NVML, or the labelled
estimate), their ratios (issue 14's targets: ≥ 1.4× tokens/s, ≤ 0.75× joules/token), the
acceptance rate and k, and whether the outputs were identical. onnxruntime-genai's own
speculative decoding runs beside it when ``bench/genai_spec.py`` says it can.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from models.build.pipeline.speculative import QUESTIONS
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.session import share_pool_if_uniform
from models.runtime.engine.speculative import SpeculativeEngine
from models.runtime.ladder import load_ladder
from models.runtime.manifest import SPECULATIVE, Manifest
from telemetry.factory import MeterConfig, create_meter

EXTRA_QUESTIONS = ("What is the capital of France? Answer in one sentence.",)


def _run(engine: Engine, ids: list[int], params: GenerationParams,
         meter: Any) -> tuple[list[int], float, float]:
    """(tokens, decode seconds after the first token, joules of the whole run)."""
    mark = meter.begin()
    t0 = time.perf_counter()
    first = 0.0
    tokens = []
    for chunk in engine.stream(ids, params):
        if chunk.token_id >= 0:
            first = first or time.perf_counter()
            tokens.append(chunk.token_id)
    end = time.perf_counter()
    reading = meter.end(mark)
    del t0
    return tokens, end - first, reading.joules


def compared(meter: Any, spec: Any, identical: int, total: int, rates: dict[str, list[float]],
             jpt: dict[str, list[float]]) -> dict[str, Any]:
    """The figures both speculative benches report: the meter, acceptance, identical texts,
    median tok/s and J/token of each engine, and the rung's J/token over full's per round."""
    return {"energy_source": meter.source, "energy_estimated": meter.estimated,
            "acceptance_rate": spec.accepted / max(1, spec.drafted),
            "identical_outputs": f"{identical}/{total}",
            "tokens_per_s": {n: statistics.median(v) for n, v in rates.items()},
            "joules_per_token": {n: statistics.median(v) for n, v in jpt.items()},
            "joules_ratio_per_round": [s / f for s, f in zip(jpt[SPECULATIVE], jpt["full"],
                                                             strict=True)]}


def run_bench(ladder: Path, draft: str | None = None, k: int | None = None,
              new_tokens: int = 128, rounds: int = 3, threads: int = 2,
              variant_threads: dict[str, int] | None = None) -> dict[str, Any]:
    # threads as the service runs them by default (the build's measured choice): one shared
    # pool, or each variant its own
    manifest = Manifest.load(ladder)
    variant_threads = dict(manifest.serve_threads() if variant_threads is None
                           else variant_threads)
    share_pool_if_uniform(threads, variant_threads.values())
    spec_info = manifest.variants.get(SPECULATIVE)
    chosen = spec_info.speculative if spec_info else None
    draft = draft or (chosen.draft if chosen else "int8")
    k = k or (chosen.k if chosen else 5)
    loaded = load_ladder(ladder, threads=threads, runtime="onnxruntime",
                         only=["full", draft], warmup=False, variant_threads=variant_threads)
    full, drafter = loaded.engines["full"], loaded.engines[draft]
    assert isinstance(full, OrtEngine) and isinstance(drafter, OrtEngine)
    spec = SpeculativeEngine(full, drafter, k)
    template = ChatTemplate.for_directory(ladder)
    prompts = [full.encode(template.render([{"role": "user", "content": q}]))
               for q in (*QUESTIONS, *EXTRA_QUESTIONS)]
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    meter = create_meter(MeterConfig("auto", "cpu", None, None, 10.0, 0.1,
                                     Path("/sys/class/powercap"), 10.0, 0.0))
    engines: dict[str, Engine] = {"full": full, SPECULATIVE: spec}
    for e in engines.values():
        e.generate(prompts[0], GenerationParams(max_new_tokens=16, ignore_eos=True))
    spec.drafted = spec.accepted = 0
    rates: dict[str, list[float]] = {n: [] for n in engines}
    jpt: dict[str, list[float]] = {n: [] for n in engines}
    identical = total = 0
    for _ in range(rounds):
        outs: dict[str, list[list[int]]] = {n: [] for n in engines}
        for name, engine in engines.items():
            secs = joules = 0.0
            for ids in prompts:
                tokens, s, j = _run(engine, ids, params, meter)
                outs[name].append(tokens)
                secs += s
                joules += j
            rates[name].append(len(prompts) * (new_tokens - 1) / secs)
            jpt[name].append(joules / (len(prompts) * new_tokens))
        for a, b in zip(outs["full"], outs[SPECULATIVE], strict=True):
            identical += a == b
            total += 1
    result: dict[str, Any] = {
        "draft": draft, "k": k, "new_tokens": new_tokens, "prompts": len(prompts),
        "rounds": rounds, "threads": threads,
        "variant_threads": {n: variant_threads.get(n, threads) for n in ("full", draft)},
        **compared(meter, spec, identical, total, rates, jpt),
        "speedup_per_round": [s / f for s, f in zip(rates[SPECULATIVE], rates["full"],
                                                    strict=True)],
        "build_choice": manifest.speculative_choice,
    }
    try:
        from bench.genai_spec import genai_speculative

        result["genai"] = genai_speculative(ladder, draft, k, prompts, new_tokens, threads)
        result["genai"].pop("tokens", None)
    except Exception as err:  # the peer is optional: say why it did not run
        result["genai"] = {"error": str(err).splitlines()[0] if str(err) else repr(err)}
    meter.close()
    return result


def report(f: dict[str, Any]) -> str:
    tps, jpt = f["tokens_per_s"], f["joules_per_token"]
    speed = statistics.median(f["speedup_per_round"])
    energy = statistics.median(f["joules_ratio_per_round"])
    lines = [
        f"speculative rung: draft {f['draft']}, k {f['k']}; greedy, {f['new_tokens']} tokens, "
        f"batch 1, {f['prompts']} chat prompts x {f['rounds']} rounds, threads "
        f"{f.get('variant_threads') or f['threads']}",
        f"{'engine':<18}{'tok/s':>9}{'J/token':>10}",
        f"{'full':<18}{tps['full']:>9.1f}{jpt['full']:>10.4f}",
        f"{SPECULATIVE:<18}{tps[SPECULATIVE]:>9.1f}{jpt[SPECULATIVE]:>10.4f}",
        f"acceptance rate {f['acceptance_rate']:.3f}; identical outputs {f['identical_outputs']}"
        f"; energy source {f['energy_source']}"
        + (" (an estimate)" if f["energy_estimated"] else ""),
        f"tokens/s {speed:.2f}x full (per round {[round(x, 2) for x in f['speedup_per_round']]};"
        f" target >= 1.4): {'met' if speed >= 1.4 else 'MISSED'}",
        f"joules/token {energy:.2f}x full (per round "
        f"{[round(x, 2) for x in f['joules_ratio_per_round']]}; target <= 0.75): "
        f"{'met' if energy <= 0.75 else 'MISSED'}",
    ]
    g = f.get("genai") or {}
    if "error" in g:
        lines.append(f"onnxruntime-genai speculative: not run ({g['error']})")
    elif g:
        lines.append(f"onnxruntime-genai speculative: {g.get('tokens_per_s', 0):.1f} tok/s, "
                     f"acceptance {g.get('acceptance_rate')}")
    return "\n".join(lines)
