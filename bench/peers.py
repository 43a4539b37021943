"""``greenroute bench peers``: our rungs against llama.cpp's ``llama-server`` on the same
weights, taking turns in one run.

Pairs (the same SmolLM2 weights): our ``full`` against llama.cpp's F32 GGUF (both the
dequantized Q4_1 release), ``int8`` against Q8_0, ``int4`` against the Q4_1 release itself.
The F32 and Q8_0 GGUFs are made from the cached release with ``llama-quantize
--allow-requantize`` (found beside the server; ``../shared/PEERS.md`` says how to build both).

For each client count, each round runs every engine once, in an order that rotates every round:
closed-loop clients send the same raw prompts back to back (greedy, ``new_tokens`` generated,
EOS ignored, llama.cpp's prompt cache off), and the engine's figure is generated tokens over
the wall time. Energy is the same labelled estimate for both sides: the server process's CPU
time over the window (``/proc``, every thread) × ``watts_per_core``. Medians over the rounds.

``GREENROUTE_LLAMA_SERVER`` names the ``llama-server`` binary; without it (or when it cannot
start) only our rungs are measured, and the report says so.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.live import free_port, http_process, live_service
from models.runtime.manifest import Manifest, cache_root

PAIRS = {"full": "f32", "int8": "q8_0", "int4": "q4_1"}
# measured beside them, with no llama.cpp pair (llama.cpp has no such model)
UNPAIRED = ("distilled-int8",)
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the default model's release (the build caches it)
PROMPTS = [
    "The json module", "Return a new list of the items in", "Raise ValueError if the",
    "The interpreter reads the file and", "A context manager is an object that",
    "Use the logging module to", "This function returns the number of", "Changed in version",
]
TICK_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S


def make_ggufs(server: Path, out: Path, source: Path) -> dict[str, Path]:
    """F32 and Q8_0 requantized from the release with the server's ``llama-quantize``; Q4_1
    is the release."""
    quantize = server.parent / "llama-quantize"
    out.mkdir(parents=True, exist_ok=True)
    ggufs = {"q4_1": source}
    for kind, ftype in (("f32", "F32"), ("q8_0", "Q8_0")):
        path = out / f"smollm2-135m-{kind}.gguf"
        if not path.is_file():
            subprocess.run([str(quantize), "--allow-requantize", str(source), str(path), ftype],
                           check=True, capture_output=True)
        ggufs[kind] = path
    return ggufs


@contextmanager
def llama_server(server: Path, gguf: Path, threads: int, slots: int,
                 ready_timeout_s: float = 60.0) -> Iterator[tuple[httpx.Client, int]]:
    """A client of a fresh ``llama-server`` on ``gguf``, and its process id."""
    port = free_port()
    argv = [str(server), "-m", str(gguf), "-np", str(slots), "-c", str(512 * slots),
            "-t", str(threads), "--port", str(port), "--host", "127.0.0.1"]
    with http_process(argv, port, "/health", f"llama-server on {gguf}",
                      ready_timeout_s=ready_timeout_s, stop_timeout_s=30) as served:
        yield served


Send = Callable[[httpx.Client, str], int]


def ours(variant: str, new_tokens: int) -> Send:
    def send(c: httpx.Client, prompt: str) -> int:
        r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": new_tokens,
                                         "variant": variant, "temperature": 0,
                                         "ignore_eos": True})
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])
    return send


def theirs(new_tokens: int) -> Send:
    def send(c: httpx.Client, prompt: str) -> int:
        r = c.post("/completion", json={"prompt": prompt, "n_predict": new_tokens,
                                        "temperature": 0, "ignore_eos": True,
                                        "cache_prompt": False})
        r.raise_for_status()
        return int(r.json()["tokens_predicted"])
    return send


def closed_loop(c: httpx.Client, send: Send, pid: int, clients: int, per_client: int,
                watts_per_core: float) -> dict[str, float]:
    """``clients`` clients, each sending ``per_client`` requests back to back."""
    def client(k: int) -> int:
        return sum(send(c, PROMPTS[(k + i) % len(PROMPTS)]) for i in range(per_client))

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "j_per_token": cpu * watts_per_core / tokens}


# Our service as it runs by default, beside the like-for-like configuration (every rung on
# ``threads``, as llama-server -t): the quantized rungs on one core, with and without their
# session on both cores for wide forwards (GREENROUTE_WIDE_FROM_ROWS)
SERVED = {"served": {"GREENROUTE_VARIANT_THREADS": "int8=1,int4=1,distilled=1,distilled-int8=1",
                     "GREENROUTE_WIDE_FROM_ROWS": "4"},
          "served, no wide session": {
              "GREENROUTE_VARIANT_THREADS": "int8=1,int4=1,distilled=1,distilled-int8=1",
              "GREENROUTE_WIDE_FROM_ROWS": "0"}}


def run_bench(ladder: Path, clients: tuple[int, ...] = (1, 4, 16), rounds: int = 3,
              new_tokens: int = 64, threads: int = 2, watts_per_core: float = 10.0,
              variant_threads: str = "", server: str | None = None,
              served: bool = False) -> dict[str, Any]:
    """Every engine at every client count, taking turns; medians over ``rounds``. With
    ``served``, also the quantized rungs as the service runs them by default (:data:`SERVED`),
    each configuration its own live service."""
    server = server or os.environ.get("GREENROUTE_LLAMA_SERVER")
    built = Manifest.load(ladder).variants
    pairs = {v: kind for v, kind in PAIRS.items() if v in built}
    pairs.update({v: "" for v in UNPAIRED if v in built})
    base = {"GREENROUTE_THREADS": str(threads), "GREENROUTE_QUEUE_SIZE": "64",
            "GREENROUTE_VARIANTS": ",".join(pairs)}
    configs = {"": {"GREENROUTE_VARIANT_THREADS": variant_threads,
                    "GREENROUTE_WIDE_FROM_ROWS": "0"}}
    if served:
        configs.update(SERVED)
    skipped = None
    engines: dict[str, tuple[httpx.Client, int, Send]] = {}
    with ExitStack() as stack:
        for label, env in configs.items():
            pids: list[int] = []
            c = stack.enter_context(live_service(ladder, {**base, **env}, pids=pids))
            for v in pairs if not label else [v for v in pairs if v != "full"]:
                name = f"ours {v}" + (f" ({label})" if label else "")
                engines[name] = (c, pids[0], ours(v, new_tokens))
        if server and Path(server).is_file():
            ggufs = make_ggufs(Path(server), cache_root() / "peers",
                               cache_root() / "sources" / SOURCE_GGUF)
            for kind, gguf in ggufs.items():  # every kind: one our ladder lacks is still shown
                lc, lpid = stack.enter_context(llama_server(Path(server), gguf, threads,
                                                            max(clients)))
                engines[f"llama.cpp {kind}"] = (lc, lpid, theirs(new_tokens))
        else:
            skipped = ("llama-server not measured: set GREENROUTE_LLAMA_SERVER to its binary "
                       "(../shared/PEERS.md says how to build it)")
        names = list(engines)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            str(n): {e: [] for e in names} for n in clients}
        for n in clients:
            per_client = max(2, 16 // n)
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    client, pid, send = engines[name]
                    runs[str(n)][name].append(closed_loop(client, send, pid, n, per_client,
                                                          watts_per_core))
    medians = {n: {e: {k: statistics.median(x[k] for x in xs) for k in ("tok_s", "j_per_token")}
                   for e, xs in per.items()} for n, per in runs.items()}
    return {"clients": list(clients), "rounds": rounds, "new_tokens": new_tokens,
            "threads": threads, "variant_threads": variant_threads, "server": server,
            "configs": configs,
            "skipped": skipped, "watts_per_core": watts_per_core, "runs": runs,
            "medians": medians}


def report(f: dict[str, Any]) -> str:
    lines = [f"bench peers: {f['new_tokens']} tokens per request, greedy, EOS ignored; "
             f"{f['threads']} threads (ours: GREENROUTE_VARIANT_THREADS="
             f"{f['variant_threads']!r}); medians of {f['rounds']} rounds taking turns; "
             f"energy: estimate, process CPU time x {f['watts_per_core']:g} W per core"]
    if f["skipped"]:
        lines.append(f"  {f['skipped']}")
    for n, per in f["medians"].items():
        lines.append(f"  {n} client(s):")
        for name, m in per.items():
            lines.append(f"    {name:<36} {m['tok_s']:8.1f} tok/s  {m['j_per_token']:.4f} J/token")
        for ours_v, kind in PAIRS.items():
            a, b = per.get(f"ours {ours_v}"), per.get(f"llama.cpp {kind}")
            if b and not a:
                lines.append(f"    ours {ours_v}: not in this ladder (the build did not earn it); "
                             f"llama.cpp {kind} is shown beside the rungs it has")
            if a and b:
                lines.append(f"    ours {ours_v} / llama.cpp {kind}: {a['tok_s'] / b['tok_s']:.2f}x"
                             f" tok/s, {a['j_per_token'] / b['j_per_token']:.2f}x J/token")
        full = per.get("ours full")
        for name, m in per.items():
            if full and name.startswith(("ours int8", "ours distilled-int8")):
                lines.append(f"    {name} / ours full: {m['tok_s'] / full['tok_s']:.2f}x tok/s")
    return "\n".join(lines)
