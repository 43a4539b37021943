"""The marginal-joules signal for endpoint pickers: what one more request would add to a
replica's device now, per expected token, from the router's lifetime pricing."""

from __future__ import annotations

import math

from routing.cost import CostModel
from routing.router import Router
from routing.timeline import Load


def router() -> Router:
    """int8: cheap steps that widen cheaply; full: dearer ones. Both at 20 W."""
    costs = {"full": CostModel(0.5, 20.0, 20.0, widths={4: 24.0, 8: 30.0, 16: 40.0}),
             "int8": CostModel(0.3, 8.0, 20.0, widths={4: 9.0, 8: 10.0, 16: 12.0})}
    return Router({"full": 1.0, "int8": 0.99}, costs)


NAMES = {"full", "int8"}


def test_it_falls_when_a_wide_batch_can_take_the_request() -> None:
    r = router()
    idle = r.marginal_joules_per_token(0.0, 64, 128, NAMES, {})
    # int8 steps 8 rows for at least the request's life: it pays a row's increment only
    wide = r.marginal_joules_per_token(0.0, 64, 128, NAMES, {"int8": Load.rows(8, 200)})
    assert wide < idle / 3
    # an idle device: the request pays int8's whole one-row steps (8 ms at 20 W a token)
    assert idle > 0.8 * 8.0 * 20.0 / 1000


def test_it_rises_when_the_only_cheap_batch_is_full() -> None:
    r = router()
    room = r.marginal_joules_per_token(0.0, 64, 128, NAMES, {"int8": Load.rows(8, 200)})
    # the same batch with no free row (a wait for one): the request would pay full's steps
    full_batch = Load((200,) * 8, (math.inf,) * 8, queue_wait_ms=1600.0)
    no_room = r.marginal_joules_per_token(0.0, 64, 128, NAMES, {"int8": full_batch})
    assert no_room > 2 * room
    # and a floor int8 does not meet prices full's rows whatever int8's batch holds
    exact = r.marginal_joules_per_token(1.0, 64, 128, NAMES, {"int8": Load.rows(8, 200)})
    assert exact > room


def test_it_is_nan_when_no_loaded_rung_meets_the_floor() -> None:
    assert math.isnan(router().marginal_joules_per_token(1.0, 64, 128, {"int8"}, {}))
