"""The batched verify graph: ``full``'s graph with every ``GroupQueryAttention`` swapped for
greenroute's ``BatchedGroupQueryAttention`` (``kernels/attention.cc``), so the speculative rung
verifies several rows' drafts (``[rows, k + 1]`` new positions after each row's past) in one
forward, which onnxruntime's operator refuses at batch > 1.

Written beside the graph as ``<stem>.verify.onnx``: the same inputs and outputs plus
``new_counts`` (int32 ``[batch]``: each row's real new positions; a shorter row is padded, a row
taking no part has 0), and the same weights (its initializers still point at the graph's
external data file, so nothing is copied). Only the
builder's packed-QKV form with rotary inside is rewritten (``do_rotary``, halves not interleaved,
no local window or softcap); any other graph gets no verify graph, and the rung verifies row by
row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.runtime.kernels import DOMAIN, NEW_COUNTS, OP_BATCHED_GQA, verify_graph_path


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def write_verify_graph(model_path: Path) -> Path | None:
    """Write ``model_path``'s verify graph (replacing an older one); its path, or ``None`` when
    the graph's attention is not the form the operator takes."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    nodes = [n for n in model.graph.node
             if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        return None
    for node in nodes:
        a = _attrs(node)
        inputs = list(node.input) + [""] * (9 - len(node.input))
        if (inputs[1] or inputs[2] or not inputs[7] or not inputs[8] or a.get("do_rotary") != 1
                or a.get("rotary_interleaved", 0) != 0 or a.get("local_window_size", -1) != -1
                or a.get("softcap", 0.0) != 0.0 or any(inputs[9:])):
            return None
    ids = [i for i in model.graph.input if i.name == "input_ids"]
    dims = ids[0].type.tensor_type.shape.dim if ids else []
    batch = (dims[0].dim_param or dims[0].dim_value) if dims else "batch_size"
    counts = onnx.helper.make_tensor_value_info(NEW_COUNTS, onnx.TensorProto.INT32, [batch])
    model.graph.input.append(counts)
    for node in nodes:
        a = _attrs(node)
        q, _, _, past_k, past_v, seqlens, total, cos, sin = list(node.input)[:9]
        new = onnx.helper.make_node(
            OP_BATCHED_GQA, [q, past_k, past_v, seqlens, total, cos, sin, NEW_COUNTS],
            list(node.output),
            name=node.name, domain=DOMAIN, num_heads=a["num_heads"],
            kv_num_heads=a["kv_num_heads"], scale=float(a.get("scale", 0.0)))
        node.CopyFrom(new)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    out = verify_graph_path(model_path)
    onnx.save(model, str(out))
    return out
