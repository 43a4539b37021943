"""The router inside the real app with tiny models: floors, infeasible budgets, load, power."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from routing.cost import CostModel
from telemetry.base import EnergyMeter


def gen(c: TestClient, **body: object) -> dict:  # type: ignore[type-arg]
    resp = c.post("/v1/generate", json={"prompt": "The json", "max_new_tokens": 8, **body})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_quality_floor_of_one_always_gets_full(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    with cf.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: gen(c, budget={"min_quality": 1.0}), range(8)))
    assert {b["variant"] for b in bodies} == {"full"}
    for b in bodies:
        why = {x["variant"]: x["why"] for x in b["route"]["candidates"]}
        assert all(w == "quality_below_floor" for v, w in why.items() if v != "full")


def test_no_floor_picks_the_lowest_predicted_joules(make_client: Callable[..., TestClient]
                                                    ) -> None:
    body = gen(make_client(), budget={"min_quality": 0.0})
    cands = body["route"]["candidates"]
    assert body["route"]["reason"] == "cheapest_feasible"
    assert body["variant"] == min(cands, key=lambda x: x["predicted_joules"])["variant"]


def test_infeasible_budget_best_effort_or_reject(make_client: Callable[..., TestClient]) -> None:
    tight = {"budget": {"latency_ms": 0.001, "min_quality": 0.0}}
    body = gen(make_client(), **tight)
    assert body["route"]["reason"] == "best_effort"
    fastest = min(body["route"]["candidates"], key=lambda x: x["predicted_latency_ms"])
    assert body["variant"] == fastest["variant"]
    strict = make_client(on_infeasible="reject")
    resp = strict.post("/v1/generate", json={"prompt": "x", **tight})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["type"] == "budget_unsatisfiable" and "best achievable latency" in err["message"]


def test_requests_under_load_are_priced_in_the_batch_they_join(
    make_client: Callable[..., TestClient],
) -> None:
    """Under a burst, each request is predicted in the batch it joins: full's predicted
    latency there is never below its latency alone and grows with the work ahead of it, and a
    request that no variant can serve in time is served best effort (and says so)."""
    c = make_client(queue_size=32)
    router = c.app.state.service.router  # type: ignore[attr-defined]
    # fixed (non-learning) costs: full is the cheapest in joules but the slowest
    costs = {"full": CostModel(0.1, 1.0, watts=1.0, alpha=0.0),
             "int8": CostModel(0.05, 0.5, watts=10.0, alpha=0.0),
             "int4": CostModel(0.05, 0.6, watts=50.0, alpha=0.0),
             "distilled": CostModel(0.05, 0.6, watts=100.0, alpha=0.0),
             "distilled-int8": CostModel(0.05, 0.6, watts=100.0, alpha=0.0)}
    router._costs = {n: costs[n] for n in router._costs}
    body = {"max_new_tokens": 100, "budget": {"latency_ms": 150, "min_quality": 0.0}}
    idle = gen(c, **body)
    assert idle["variant"] == "full" and idle["route"]["reason"] == "cheapest_feasible"
    alone = next(x for x in idle["route"]["candidates"] if x["variant"] == "full")
    with cf.ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda _: gen(c, **body), range(16)))
    fulls = [next(x for x in b["route"]["candidates"] if x["variant"] == "full")
             for b in burst]
    assert max(f["occupancy"] for f in fulls) >= 2  # requests joined a running batch
    assert all(f["predicted_latency_ms"] >= alone["predicted_latency_ms"] - 1e-6 for f in fulls)
    busiest = max(fulls, key=lambda f: f["occupancy"])
    assert busiest["predicted_latency_ms"] > alone["predicted_latency_ms"]
    for b in burst:  # the reason follows the candidates: best effort exactly when none fits
        chosen = next(x for x in b["route"]["candidates"] if x["variant"] == b["variant"])
        if any(x["eligible"] for x in b["route"]["candidates"]):
            assert b["route"]["reason"] == "cheapest_feasible" and chosen["eligible"]
        else:
            assert b["route"]["reason"] == "best_effort"
    assert any(f["why"] == "over_latency_budget" for f in fulls)
    # sharing full's steps, its attributed joules per request fall as the batch grows
    assert busiest["predicted_joules"] < alone["predicted_joules"]


def test_power_cap_routes_to_the_cheapest_allowed(make_client: Callable[..., TestClient]) -> None:
    c = make_client(power_cap_watts=0.001)
    gen(c)  # the first run puts measured power over the tiny cap
    body = gen(c, budget={"min_quality": 0.0})
    assert body["route"]["reason"] == "power_cap"
    cands = body["route"]["candidates"]
    assert body["variant"] == min(cands, key=lambda x: x["predicted_joules"])["variant"]
    text = c.get("/metrics").text
    assert 'reason="power_cap"' in text


def test_the_power_cap_reads_the_device_while_requests_run(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """The cap's signal is the device's live power, not the joules of requests that ended: the
    package counter (a fake sysfs RAPL tree, the hardware boundary) climbs 100 J while no
    request has finished (as under a long generation), and the next request is shed at once.
    Summing finished requests' joules (the old signal) read 0 W here."""
    from tests.telemetry.fakes import make_powercap, set_energy

    root = make_powercap(tmp_path / "powercap", {0: 1_000_000})
    c = make_client(rapl_root=root, power_cap_watts=5.0, power_window_s=600.0)
    first = gen(c, budget={"min_quality": 0.0})
    assert first["route"]["reason"] == "cheapest_feasible"  # the counter has not moved: 0 W
    assert c.get("/v1/variants").json()["power_watts"] == 0.0
    set_energy(root, "intel-rapl:0", 101_000_000)  # the package spent 100 J meanwhile
    body = gen(c, budget={"min_quality": 0.0})
    assert body["route"]["reason"] == "power_cap"
    assert c.get("/v1/variants").json()["power_watts"] > 5.0


def test_variants_show_learned_coefficients(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    before = {v["name"]: v["cost"]["observations"] for v in c.get("/v1/variants").json()["data"]}
    gen(c, variant="int8")
    after = {v["name"]: v["cost"]["observations"] for v in c.get("/v1/variants").json()["data"]}
    assert after["int8"] > before["int8"]  # its prefill and every step it took
    assert after["full"] == before["full"]


class GatedMeter(EnergyMeter):
    """The hardware boundary: a counter whose reads wait until the gate opens, so the lane is
    held at the start of its work with a request submitted and not yet in a row."""

    source = "estimate"
    estimated = True

    def __init__(self, inner: EnergyMeter) -> None:
        super().__init__()
        self.inner = inner
        self.gate = threading.Event()
        self.reading = threading.Event()

    def total_joules(self) -> float:
        self.reading.set()
        self.gate.wait(30)
        return self.inner.total_joules()


@pytest.mark.parametrize("variant", [None, "full"], ids=["routed", "pinned"])
def test_power_cap_refuses_queued_work_when_shedding_is_not_enough(
    make_client: Callable[..., TestClient], variant: str | None,
) -> None:
    """Over the cap with work already queued, a request is refused with 429, routed (already
    on the cheapest variant) or pinned (an OpenAI client always names a model)."""
    c = make_client(power_cap_watts=0.001, queue_size=32)
    gen(c)  # its joules put the recent power over the tiny cap
    ledger = c.app.state.service.executor.lane.ledger  # type: ignore[attr-defined]
    meter = ledger.meter = GatedMeter(ledger.meter)
    body = {"prompt": "x", "max_new_tokens": 8}
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/generate", json=body)
        assert meter.reading.wait(30)  # the lane holds the first request, not yet in a row
        refused = c.post("/v1/generate", json={**body, "variant": variant})
        meter.gate.set()
        assert first.result().status_code == 200
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "power_cap"
    assert int(refused.headers["retry-after"]) >= 1
    # under the cap (a fresh service), the same pinned request is served
    assert gen(make_client(queue_size=32), variant="full")["variant"] == "full"


def test_max_joules_stops_generation_and_the_route_says_so(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client()
    free = gen(c, variant="full", max_new_tokens=120, ignore_eos=True)
    assert free["usage"]["completion_tokens"] == 120 and free["finish_reason"] == "length"
    assert free["route"]["max_joules_reached"] is False
    cap = free["energy"]["joules"] / 10  # a tenth of what the whole answer cost
    capped = gen(c, variant="full", max_new_tokens=120, ignore_eos=True,
                 budget={"max_joules": cap, "latency_ms": 60_000})
    assert capped["finish_reason"] == "energy"
    assert capped["route"]["max_joules_reached"] is True and capped["route"]["max_joules"] == cap
    assert 1 <= capped["usage"]["completion_tokens"] < 120
    assert capped["energy"]["joules"] >= cap
    assert capped["route"]["latency_met"] is True and capped["route"]["latency_budget_ms"] == 60_000
    chat = c.post("/v1/completions", json={"model": "full", "prompt": "The json",
                                           "max_tokens": 120, "max_joules": cap})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] == "length"  # OpenAI has no "energy"
    assert chat.json()["usage"]["completion_tokens"] < 120


class BrokenMeter(EnergyMeter):
    """The hardware boundary: every counter read fails."""

    source = "estimate"

    def total_joules(self) -> float:
        raise OSError("energy counter read failed")


def test_a_dead_lane_answers_503_and_fails_the_health_check(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(exit_on_lane_failure=False)  # (this process is pytest: no SIGTERM)
    assert c.get("/health").status_code == 200
    c.app.state.service.executor.lane.ledger.meter = BrokenMeter()  # type: ignore[attr-defined]
    first = c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 4})
    assert first.status_code == 503 and first.json()["error"]["type"] == "lane_failed"
    after = c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 4})
    assert after.status_code == 503 and after.json()["error"]["type"] == "lane_failed"
    health = c.get("/health")
    assert health.status_code == 503 and health.json()["error"]["type"] == "lane_failed"


def test_a_stream_abandoned_before_its_first_byte_stops_and_settles(
    make_client: Callable[..., TestClient],
) -> None:
    """The streaming response's background task (run when the client left before the body
    started) cancels the generation and brings the in-flight gauge back to zero."""
    from app.service import Call
    from models.runtime.engine.base import GenerationParams
    from routing.policy import Budget
    from serving.events import Chunks, Skipped

    c = make_client()
    service = c.app.state.service  # type: ignore[attr-defined]
    params = GenerationParams(max_new_tokens=100, ignore_eos=True)

    async def abandon() -> str:
        run = service.open(Call("The json", params, Budget(60_000, 0.0), "/v1/generate",
                                stream=True))
        run.abandon()  # what StreamingResponse's background runs after an early disconnect
        event = await run._handle.next()
        while isinstance(event, Chunks):
            event = await run._handle.next()
        return "skipped" if isinstance(event, Skipped) else event.finish_reason

    outcome = c.portal.call(abandon)  # type: ignore[union-attr]
    assert outcome in ("skipped", "cancelled")
    text = c.get("/metrics").text
    assert "greenroute_inflight_requests 0.0" in text
    assert 'status="cancelled"' in text
