"""Checks against the compose stack brought up by deploy/compose-test.sh (`make compose-test`):
real traffic through the service, then Prometheus's view of it through its HTTP API, the cache
volume across `compose down` / `up`, and SIGTERM during a generation. Standard library and
``openai`` only (the image smoke test's venv); prints PASS/FAIL per check, exits 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import math
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("smoke_checks", HERE / "smoke_checks.py")
assert _spec is not None and _spec.loader is not None
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
check, get, failures = smoke.check, smoke.get, smoke.failures


class Tally:
    """Every answer's joules and variant, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.joules = 0.0
        self.variants: set[str] = set()
        self.statuses: dict[int, int] = {}

    def add(self, status: int, joules: float = 0.0, variant: str | None = None) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.joules += joules
            if variant:
                self.variants.add(variant)


Answer = tuple[int, Any, dict[str, str]]


def post(base: str, path: str, body: dict[str, Any], timeout: float = 300) -> Answer:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


def native(base: str, tally: Tally, prompt: str, floor: float, tokens: int = 24,
           variant: str | None = None) -> int:
    body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": tokens,
                            "budget": {"min_quality": floor}}
    if variant:
        body["variant"] = variant
    status, out, headers = post(base, "/v1/generate", body)
    if status == 200:
        tally.add(200, out["energy"]["joules"], out["route"]["variant"])
    else:
        assert status != 429 or "retry-after" in {k.lower() for k in headers}, headers
        tally.add(status)
    return status


def stream(base: str, tally: Tally) -> str:
    req = urllib.request.Request(f"{base}/v1/generate", data=json.dumps(
        {"prompt": "The json module", "max_new_tokens": 24, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    tokens, done = 0, None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                tokens += event.get("type") == "token"
                done = event if event.get("type") == "done" else done
    assert done is not None, "no done event"
    tally.add(200, done["energy"]["joules"], done["route"]["variant"])
    return f"{tokens} tokens streamed, {done['energy']['joules']:.2f} J"


def traffic(base: str, tally: Tally) -> str:
    """Native at both ends of the ladder, OpenAI chat, a stream, and a burst on ``full`` past
    its rows and the queue (GREENROUTE_QUEUE_SIZE=2): some of it gets 429 with Retry-After."""
    for floor in (0.0, 1.0, 0.5, 0.9):
        assert native(base, tally, "The json module can", floor) == 200
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="compose", max_retries=0, timeout=300)
    chat = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Name a prime number."}],
        max_tokens=16, temperature=0.0)
    usage = chat.usage.model_extra or {}  # type: ignore[union-attr]
    tally.add(200, usage["energy_joules"], chat.model)
    streamed = stream(base, tally)
    with cf.ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(lambda i: native(base, tally, f"Story {i}:", 0.0, 96, "full"),
                              range(24)))
    refused = burst.count(429)
    assert refused > 0, f"no 429 in a burst of 24 on a batch of 16 rows + 2 queued: {burst}"
    return (f"{tally.statuses.get(200, 0)} answered ({sorted(tally.variants)}), {refused} "
            f"refused with 429; chat usage {usage['energy_joules']:.2f} J; stream {streamed}")


def query(prom: str, q: str) -> list[dict[str, Any]]:
    status, body = get(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': q})}")
    assert status == 200, f"{q}: HTTP {status} {body[:200]}"
    data = json.loads(body)["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]  # type: ignore[no-any-return]


def finite(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in series if math.isfinite(float(s["value"][1]))]


def targets_and_rules(prom: str) -> str:
    deadline = time.monotonic() + 120
    while not (up := query(prom, 'up{job="greenroute"} == 1')):
        assert time.monotonic() < deadline, "the greenroute target never came up"
        time.sleep(2)
    _, body = get(f"{prom}/api/v1/rules")
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    bad = [r["name"] for r in rules if r.get("health") not in ("ok", "unknown")]
    assert rules and not bad, f"rules: {len(rules)}, unhealthy: {bad}"
    return (f"target up ({[s['metric'].get('service') for s in up]}), {len(rules)} rules "
            f"loaded, healthy")


def promtool(podman: list[str], image: str) -> str:
    """promtool (in the Prometheus image) on the repository's config and rules."""
    out = []
    for args in (["check", "config", "/etc/prometheus/prometheus.yml"],
                 ["check", "rules", "/etc/prometheus/rules.yml"]):
        proc = subprocess.run([*podman, "run", "--rm", "--network", "none", "--entrypoint",
                               "promtool", "-v", f"{ROOT / 'deploy/prometheus'}:/etc/prometheus:ro",
                               image, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out.append(" ".join(args[:2]))
    return "; ".join(out) + ": SUCCESS"


def grafana_to_promql(expr: str) -> str:
    for var, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    return expr


def every_query_has_series(prom: str, variants: set[str]) -> str:
    """Each dashboard panel's query and each recording rule: at least one finite series, and
    where the series carry a ``variant`` label, one of the traffic's variants among them."""
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/greenroute.json").read_text())
    queries = {f"{p['title']} [{t['refId']}]": grafana_to_promql(t["expr"])
               for p in dashboard["panels"] for t in p.get("targets", [])}
    _, body = get(f"{prom}/api/v1/rules")
    queries.update({r["name"]: r["name"] for g in json.loads(body)["data"]["groups"]
                    for r in g["rules"] if r["type"] == "recording"})
    counts: dict[str, int] = {}
    deadline = time.monotonic() + 150
    pending = dict(queries)
    while pending and time.monotonic() < deadline:
        for name, q in list(pending.items()):
            series = finite(query(prom, q))
            labelled = {s["metric"]["variant"] for s in series if "variant" in s["metric"]}
            if series and (not labelled or labelled & variants):
                counts[name] = len(series)
                del pending[name]
        if pending:
            time.sleep(5)
    for name, n in sorted(counts.items()):
        print(f"  series| {n:3d}  {name}", flush=True)
    assert not pending, f"no series with the traffic's variants: {sorted(pending)}"
    return f"{len(counts)} queries ({len(dashboard['panels'])} panels' and the recording rules)"


def joules_add_up(prom: str, tally: Tally) -> str:
    """sum(greenroute_energy_joules_total) in Prometheus = the answers' joules, within 1 %."""
    deadline, got = time.monotonic() + 90, 0.0
    while time.monotonic() < deadline:
        got = sum(float(s["value"][1]) for s in query(prom, "sum(greenroute_energy_joules_total)"))
        if abs(got - tally.joules) <= 0.01 * tally.joules:
            return (f"Prometheus {got:.2f} J, the {tally.statuses.get(200, 0)} answers "
                    f"{tally.joules:.2f} J ({got / tally.joules:.4f})")
        time.sleep(3)
    raise AssertionError(f"Prometheus {got:.2f} J vs answers {tally.joules:.2f} J")


def run(compose: list[str], *args: str) -> str:
    proc = subprocess.run([*compose, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"compose {' '.join(args)}: {proc.stderr[-500:]}"
    return proc.stdout


def wait_ready(base: str, timeout_s: float = 240) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if get(f"{base}/ready", timeout=3)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"/ready not 200 within {timeout_s:.0f} s")


def volume_survives(base: str, compose: list[str]) -> str:
    marker = f"compose-test {time.time():.0f}"
    run(compose, "exec", "-T", "greenroute", "sh", "-c",
        f"echo '{marker}' > /var/cache/greenroute/compose-test-marker")
    run(compose, "down", "--timeout", "45")
    run(compose, "up", "-d")
    ready = wait_ready(base)
    kept = run(compose, "exec", "-T", "greenroute", "cat",
               "/var/cache/greenroute/compose-test-marker").strip()
    assert kept == marker, f"the cache volume lost the marker: {kept!r}"
    return f"marker kept across down/up; /ready again {ready:.0f} s after up"


def sigterm_drains(base: str, compose: list[str], podman: list[str]) -> str:
    """A streamed generation on ``full``; once tokens flow, `compose stop greenroute` (SIGTERM);
    the stream must end normally and the container exit 0."""
    req = urllib.request.Request(f"{base}/v1/generate", data=json.dumps(
        {"prompt": "Write a long story about a lighthouse keeper.", "max_new_tokens": 160,
         "variant": "full", "ignore_eos": True, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    stopped: dict[str, Any] = {}

    def stop() -> None:
        stopped["sent"] = time.monotonic()
        stopped["rc"] = subprocess.run([*compose, "stop", "greenroute"],
                                       capture_output=True).returncode
        stopped["done"] = time.monotonic()

    stopper, tokens, after, done = None, 0, 0, None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "token":
                tokens += 1
                if stopper is None:
                    stopper = threading.Thread(target=stop)
                    stopper.start()
                elif "sent" in stopped and time.monotonic() > stopped["sent"] + 1:
                    after += 1
            elif event.get("type") == "done":
                done = event
    assert stopper is not None, "no tokens streamed"
    stopper.join(90)
    assert done is not None and done["finish_reason"] == "length", f"stream ended: {done}"
    assert after > 0, "nothing was generated more than 1 s after SIGTERM: no drain shown"
    assert stopped.get("rc") == 0, f"compose stop: {stopped}"
    name = run(compose, "ps", "-a", "--format", "{{.Name}}", "greenroute").strip()
    code = subprocess.run([*podman, "inspect", "--format", "{{.State.ExitCode}}", name],
                          capture_output=True, text=True).stdout.strip()
    assert code == "0", f"exit code {code}"
    return (f"{tokens} tokens, {after} of them > 1 s after SIGTERM, finish 'length'; "
            f"container {name} exited {code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--compose", required=True, help="the compose command, space-separated")
    parser.add_argument("--podman", default="podman --runtime runc --cgroup-manager cgroupfs")
    parser.add_argument("--prometheus-image", default="localhost/greenroute-prometheus:bookworm")
    args = parser.parse_args()
    compose, podman = args.compose.split(), args.podman.split()
    tally = Tally()
    check("the service is ready", lambda: f"{wait_ready(args.base):.0f} s")
    check("Prometheus: target up, rules loaded", lambda: targets_and_rules(args.prometheus))
    check("promtool check config / rules", lambda: promtool(podman, args.prometheus_image))
    check("traffic: native, OpenAI chat, stream, 429", lambda: traffic(args.base, tally))
    # a trickle of requests keeps the dashboard's rates and quantiles live while it is read
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.wait(3.0):
            native(args.base, tally, "The json module", (0.0, 1.0)[i % 2], 8)
            i += 1

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    check("every dashboard query and recording rule has series",
          lambda: every_query_has_series(args.prometheus, tally.variants))
    stop.set()
    trickler.join(120)
    check("joules in Prometheus = the answers' joules (1 %)",
          lambda: joules_add_up(args.prometheus, tally))
    check("the cache volume survives down / up", lambda: volume_survives(args.base, compose))
    check("SIGTERM during a generation drains it, exit 0",
          lambda: sigterm_drains(args.base, compose, podman))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
