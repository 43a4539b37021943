"""The batched verify graph (greenroute.BatchedGroupQueryAttention in place of onnxruntime's
GroupQueryAttention): several new positions per row at batch > 1, on the tiny ladder's real
full graph, against onnxruntime's own operator taking the rows one at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.build.pipeline.verify_graph import write_verify_graph
from models.runtime import kernels
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.ladder import load_ladder

pytestmark = pytest.mark.skipif(not kernels.available(), reason="make kernels builds the op")


@pytest.fixture(scope="module")
def full(tiny_ladder: Path) -> OrtEngine:
    ladder = load_ladder(tiny_ladder, threads=1, runtime="onnxruntime", warmup=False,
                         only=["full"])
    engine = ladder.engines["full"]
    assert isinstance(engine, OrtEngine)
    return engine


def _filled(engine: OrtEngine, verify: int, prompts: list[list[int]]) -> KVSlots:
    slots = KVSlots(engine, 6, 64, verify_positions=verify)
    for row, ids in enumerate(prompts):
        if ids:
            slots.forward(row, ids)
    return slots


def test_the_ladder_build_writes_the_verify_graph(tiny_ladder: Path, full: OrtEngine) -> None:
    graph = kernels.verify_graph_path(full.model_path)
    assert graph.is_file()
    ops = {n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node}
    assert kernels.OP_BATCHED_GQA in ops and "GroupQueryAttention" not in ops
    assert full.load_verify()


def test_rows_appending_several_positions_in_one_forward_match_rows_alone(
        full: OrtEngine) -> None:
    """Rows of different lengths append 1 to 5 tokens in one forward; row 1 takes no part and
    row 4 is free (both inside the forward's prefix of rows): every logit matches the row's
    own forward, and every row's next step (its K/V, row 1's untouched) matches too."""
    rng = np.random.default_rng(0)
    vocab = full.kv.vocab
    prompts = [list(rng.integers(3, vocab, n)) for n in (9, 4, 17, 1)] + [[], [5, 6, 7]]
    together = _filled(full, 5, prompts)
    alone = _filled(full, 0, prompts)
    rows = [0, 2, 3, 5]
    tokens = [list(rng.integers(3, vocab, n)) for n in (5, 1, 3, 4)]
    got = [g.copy() for g in together.forward_rows(rows, tokens)]
    want = alone.forward_rows(rows, tokens)  # no verify graph: row by row (GroupQueryAttention)
    for g, w, t in zip(got, want, tokens, strict=True):
        assert g.shape == (len(t), vocab)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert list(together.lengths) == list(alone.lengths) == [14, 4, 18, 4, 0, 7]
    step = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(together.step_logits(step, [7] * 5),
                               alone.step_logits(step, [7] * 5), rtol=1e-4, atol=1e-4)


def test_more_positions_than_the_graph_was_sized_for_go_row_by_row(full: OrtEngine) -> None:
    slots = _filled(full, 2, [[4, 5, 6], [7, 8]])
    wide = _filled(full, 0, [[4, 5, 6], [7, 8]])
    got = [g.copy() for g in slots.forward_rows([0, 1], [[9, 10, 11], [12]])]
    want = wide.forward_rows([0, 1], [[9, 10, 11], [12]])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_rows_near_their_end_need_room_for_their_own_tokens_only(full: OrtEngine) -> None:
    """A row with room for one more token appends one beside a row appending four, and a full
    row takes no part (the service's start-up once failed here when padding needed room);
    a row whose own tokens do not fit is refused and nothing changes."""
    slots, alone = KVSlots(full, 3, 8, verify_positions=4), KVSlots(full, 3, 8)
    for s in (slots, alone):
        s.forward(0, [4, 5, 6, 7, 8, 9, 10])  # room for 1
        s.forward(1, [4])
        s.forward(2, [4, 5, 6, 7, 8, 9, 10, 11])  # full
    got = [g.copy() for g in slots.forward_rows([0, 1], [[3], [1, 2, 3, 4]])]
    want = alone.forward_rows([0, 1], [[3], [1, 2, 3, 4]])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert list(slots.lengths) == [8, 5, 8]
    before = slots.mask.copy()
    with pytest.raises(ValueError, match="do not fit"):
        slots.forward_rows([1, 0], [[1, 2], [1]])
    assert list(slots.lengths) == [8, 5, 8] and (slots.mask == before).all()


def test_unbound_present_outputs_carry_the_past_and_the_new_positions(full: OrtEngine) -> None:
    """Run with numpy inputs (present not bound to the past's buffer): the operator copies the
    past and writes the new K/V after each row's length; the logits equal the bound run's."""
    session = full.verify_session
    assert session is not None
    rows, length, s = 2, 16, 3
    bound = _filled(full, s, [[4, 5, 6, 7], [8, 9]])
    kv = full.kv
    past = [np.asarray(a[:rows]) for a in bound._kv]  # the rows' K/V so far
    mask = np.zeros((rows, length), np.int64)
    mask[0, : 4 + s] = 1
    mask[1, : 2 + s] = 1
    ids = np.asarray([[10, 11, 12], [13, 14, 15]], np.int64)
    feed = {"input_ids": ids, "attention_mask": mask,
            kernels.NEW_COUNTS: np.asarray([s, s], np.int32)}
    feed.update({n: p[:, :, :length].copy() for n, p in zip(kv.past_names, past, strict=True)})
    out = session.run(None, feed)
    names = [o.name for o in session.get_outputs()]
    want = bound.forward_rows([0, 1], [[10, 11, 12], [13, 14, 15]])
    for row in range(rows):
        np.testing.assert_allclose(out[0][row], want[row], rtol=1e-4, atol=1e-4)
    key = out[names.index(kv.present_names[0])]
    new = np.asarray(bound._kv[0])
    np.testing.assert_allclose(key[0, :, :7], new[0, :, :7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(key[1, :, :5], new[1, :, :5], rtol=1e-5, atol=1e-6)


def _graph(attrs: dict[str, object], key: str = "") -> onnx.ModelProto:
    f = TensorProto.FLOAT
    inputs = ["qkv", key, "", "pk", "pv", "sl", "tl", "cos", "sin"]
    node = helper.make_node("GroupQueryAttention", inputs, ["o", "k", "v"],
                            domain="com.microsoft", **attrs)
    io = [helper.make_tensor_value_info(n, f, None) for n in ("qkv", "pk", "pv", "cos", "sin")]
    io += [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("sl", "tl")]
    if key:
        io.append(helper.make_tensor_value_info(key, f, None))
    out = [helper.make_tensor_value_info(n, f, None) for n in ("o", "k", "v")]
    return helper.make_model(helper.make_graph([node], "g", io, out))


@pytest.mark.parametrize("case", ["rewritten", "no-rotary", "interleaved", "separate-kv",
                                  "window"])
def test_only_the_form_the_operator_takes_is_rewritten(tmp_path: Path, case: str) -> None:
    attrs: dict[str, object] = {"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1}
    if case == "no-rotary":
        attrs["do_rotary"] = 0
    if case == "interleaved":
        attrs["rotary_interleaved"] = 1
    if case == "window":
        attrs["local_window_size"] = 16
    path = tmp_path / "model.onnx"
    onnx.save(_graph(attrs, key="k_in" if case == "separate-kv" else ""), str(path))
    written = write_verify_graph(path)
    if case != "rewritten":
        assert written is None
        return
    assert written == tmp_path / "model.verify.onnx"
    node = onnx.load(str(written)).graph.node[0]
    assert (node.domain, node.op_type) == (kernels.DOMAIN, kernels.OP_BATCHED_GQA)
    assert list(node.input) == ["qkv", "pk", "pv", "sl", "tl", "cos", "sin", kernels.NEW_COUNTS]


@pytest.mark.parametrize("env", [{"GREENROUTE_KERNEL_ISA": "scalar"},
                                 {"GREENROUTE_ATTENTION_BLOCKED": "0"}],
                         ids=["scalar", "avx2-per-dot"])
def test_every_path_of_the_operator_matches_rows_alone(tiny_ladder: Path, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """The portable path (a CPU without AVX2 + FMA) and the AVX2 per-dot path (head sizes the
    blocked path does not take), forced in a child process (the library picks once per
    process): the same logits as onnxruntime's operator taking the rows one at a time."""
    import os
    import subprocess
    import sys

    script = f"""
import numpy as np
from pathlib import Path
from models.runtime.engine.kvslots import KVSlots
from models.runtime.ladder import load_ladder
full = load_ladder(Path({str(tiny_ladder)!r}), threads=1, runtime="onnxruntime", warmup=False,
                   only=["full"]).engines["full"]
assert full.load_verify()
rng = np.random.default_rng(1)
prompts = [list(rng.integers(3, full.kv.vocab, n)) for n in (7, 3, 12)]
a, b = KVSlots(full, 3, 48, verify_positions=4), KVSlots(full, 3, 48)
for s in (a, b):
    for row, ids in enumerate(prompts):
        s.forward(row, ids)
tokens = [list(rng.integers(3, full.kv.vocab, n)) for n in (4, 2)]
got = [g.copy() for g in a.forward_rows([0, 2], tokens)]
want = b.forward_rows([0, 2], tokens)
print(max(float(np.abs(g - w).max()) for g, w in zip(got, want)))
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4
