"""Rewriting a graph's MatMuls, shared by the families that replace them (``w8a8``,
``rowquant``, the Q4_1 ``repack``): which MatMuls may be rewritten, which weights are left
unread afterwards, and the swap itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def fp32_matmuls(graph: onnx.GraphProto, keep: tuple[str, ...] = ()) -> list[onnx.NodeProto]:
    """The graph's ``MatMul`` nodes whose weight is a 2-D fp32 initializer, in graph order,
    without those whose names hold a substring of ``keep``."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.initializer}
    found = []
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if (node.domain in ("", "ai.onnx") and w is not None and len(w.dims) == 2
                and w.data_type == TensorProto.FLOAT
                and not any(k in node.name for k in keep)):
            found.append(node)
    return found


def unused_after(graph: onnx.GraphProto, replacement: dict[str, list[onnx.NodeProto]],
                 weights: set[str]) -> set[str]:
    """Those of ``weights`` nothing reads once the MatMuls keyed in ``replacement`` are gone (a
    tied embedding's Gather keeps its fp32 copy; so does a graph output)."""
    still = {i for nd in graph.node
             if not (nd.op_type == "MatMul" and nd.output[0] in replacement) for i in nd.input}
    outputs = {o.name for o in graph.output}
    return {w for w in weights if w not in still and w not in outputs}


def replace_matmuls(graph: onnx.GraphProto, replacement: dict[str, list[onnx.NodeProto]],
                    gone: set[str], new_inits: list[onnx.TensorProto]) -> None:
    """In place: each ``MatMul`` whose output is a key of ``replacement`` becomes those nodes (in
    the graph's order), the initializers named in ``gone`` leave and ``new_inits`` join."""
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        swap = node.op_type == "MatMul" and node.output[0] in replacement
        rebuilt.extend(replacement[node.output[0]] if swap else [node])
    del graph.node[:]
    graph.node.extend(rebuilt)
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
