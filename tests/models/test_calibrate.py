"""Calibration: engines measured together take turns, in an order that rotates every round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from models.runtime.calibrate import calibrate_many, measure_wide_many
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.slots import KVSlots


@pytest.fixture(scope="module")
def engines(random_llama_builder: tuple[Path, Path]) -> dict[str, OrtEngine]:
    ckpt, onnx_dir = random_llama_builder
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return {name: OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0], threads=1)
            for name in ("a", "b", "c")}


def test_every_engine_leads_a_round_in_turn(engines: dict[str, OrtEngine],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name, engine in engines.items():
        real = engine.stream

        def stream(*args: Any, _name: str = name, _real: Any = real,
                   **kwargs: Any) -> Iterator[Any]:
            calls.append(_name)
            return _real(*args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(engine, "stream", stream)
    prompt = engines["a"].encode("def f(x):")
    out = calibrate_many(engines, prompt, new_tokens=4, repeats=4)
    warmup, rounds = calls[:3], [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert warmup == ["a", "b", "c"] and len(calls) == 15
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for cal in out.values():
        assert cal.prefill_ms_per_token > 0 and cal.decode_ms_per_token > 0
        assert cal.decode_tokens_per_s == pytest.approx(1000 / cal.decode_ms_per_token)


def test_wide_measure_steps_every_row_taking_turns(engines: dict[str, OrtEngine],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    names = {id(e): n for n, e in engines.items()}
    calls: list[tuple[str, list[int]]] = []
    real = KVSlots.step

    def step(self: KVSlots, rows: Any, tokens: Any, samplers: Any) -> list[int]:
        calls.append((names[id(self.ort_engine)], list(rows)))
        return real(self, rows, tokens, samplers)

    monkeypatch.setattr(KVSlots, "step", step)
    prompt = engines["a"].encode("def f(x):")
    out = measure_wide_many(engines, prompt, rows=3, steps=2, repeats=3)
    assert all(rows == [0, 1, 2] for _, rows in calls)  # every step is 3 rows wide
    order = [n for n, _ in calls]
    assert order[:3] == ["a", "b", "c"]  # one warm-up step each
    assert order[3:] == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a",
                         "c", "c", "a", "a", "b", "b"]
    assert set(out) == set(engines) and all(v is not None and v > 0 for v in out.values())


@pytest.mark.parametrize("k", [3, 8])
def test_step_widths_of_a_speculative_rung_whose_rounds_keep_every_draft(
        engines: dict[str, OrtEngine], k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft that is the target itself has (near-tie aside) every draft kept: up to k + 1
    tokens a round for row 0 in every width's steps. Start-up once sized the rows for 8 tokens
    a step and failed at k = 8 (the default ladder's choice on one VM); on this 128-token
    context it takes fewer steps a width instead of running out of room."""
    from models.runtime.calibrate import measure_step_widths
    from models.runtime.engine import slots as slots_module
    from models.runtime.engine.speculative import SpecSlots, SpeculativeEngine

    made: list[SpecSlots] = []
    real = slots_module.slots_for

    def keep(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(slots_module, "slots_for", keep)
    a = engines["a"]
    spec = SpeculativeEngine(a, a, k)
    out = measure_step_widths(spec, a.encode("def f(x):"), widths=(1, 2, 4, 8, 16))
    assert out is not None and set(out.ms) == {1, 2, 4, 8, 16}
    assert all(ms > 0 for ms in out.ms.values())
    (slots,) = made
    assert slots.accepted >= 0.9 * slots.drafted > 0  # rounds gave about k + 1 tokens each
