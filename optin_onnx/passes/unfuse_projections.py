"""Undo projection fusion before the analysis: one MatMul split into several projections.

onnxsim fuses MatMuls that share an input (Q, K and V of an attention) into one MatMul with the
weights concatenated, followed by a Split on the output channels:

    x --MatMul(W_qkv)--Split(axis=-1, [n, n, n])--> q, k, v

Each Split output is a projection of its own, with its own heads; the analysis follows a channel
axis per weight, and a fused axis would mix three groups. Splitting the weight instead

    x --MatMul(W_q)--> q     x --MatMul(W_k)--> k     x --MatMul(W_v)--> v

computes the same values (column slices of one product) and makes every projection an ordinary
source again. Only MatMuls with a 2-D constant weight whose output goes nowhere but that Split, on
its last axis, are rewritten.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optin_onnx.graph import attr, const_array


def _split_sizes(split: ir.Node, width: int) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const_array(split.inputs[1])
        return None if sizes is None else [int(s) for s in np.reshape(sizes, -1)]
    if attr(split, "split") is not None:
        return [int(s) for s in attr(split, "split")]
    n = attr(split, "num_outputs", len(split.outputs))
    if width % n:
        return None
    return [width // n] * n


def split_fused_projections(model: ir.Model) -> int:
    """Rewrite every MatMul -> Split(last axis) into one MatMul per output (in place).

    Returns the number of fused MatMuls undone.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = const_array(node.inputs[1])
        uses = node.outputs[0].uses()
        if weight is None or weight.ndim != 2 or len(uses) != 1 or node.outputs[0].is_graph_output():
            continue
        split = uses[0].node
        if split.op_type != "Split" or uses[0].idx != 0 or \
                any(o.is_graph_output() for o in split.outputs):
            continue
        axis = attr(split, "axis", 0)
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            continue
        sizes = _split_sizes(split, weight.shape[1])
        if sizes is None or sum(sizes) != weight.shape[1] or len(sizes) != len(split.outputs):
            continue
        start = 0
        for i, (size, out) in enumerate(zip(sizes, split.outputs)):
            name = f"{node.name}__part{i}"
            part = ir.Value(name=f"{name}_weight",
                            const_value=ir.tensor(np.ascontiguousarray(weight[:, start:start + size]),
                                                  name=f"{name}_weight"))
            model.graph.register_initializer(part)
            matmul = ir.Node("", "MatMul", [node.inputs[0], part], name=name)
            matmul.outputs[0].name = f"{name}_out"
            model.graph.insert_before(split, matmul)
            ir.convenience.replace_all_uses_with(out, matmul.outputs[0])
            start += size
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count
