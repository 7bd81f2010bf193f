"""Where groups start: one function per op with a constant weight whose output channels can
shrink. Each creates a group on the output's channel axis and records the weight (and bias)
slices that go with it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.handlers.ort_contrib import heads_axis_inputs
from optin_onnx.analysis.structure import AttrEdit, ParamSlice, Role
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator


def conv(p: Propagator, node: ir.Node) -> None:
    out = node.outputs[0]
    w = const_array(node.inputs[1])
    if w is None or attr(node, "group", 1) != 1 or p.track(out).get(1):
        return
    gid = p.new_group(node, out, 1, w.shape[0])
    g = p.group(gid)
    g.slices.append(ParamSlice(node.name, 1, 0, Role.FLAT))
    g.nodes.append(node.name)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if const_array(node.inputs[2]) is None:
            g.stop(f"Conv '{node.name}' has a run-time bias")
        g.slices.append(ParamSlice(node.name, 2, 0, Role.FLAT))


def matmul(p: Propagator, node: ir.Node) -> None:
    out = node.outputs[0]
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or p.track(out).get(p.probe[out.name].ndim - 1):
        return
    gid = p.new_group(node, out, p.probe[out.name].ndim - 1, w.shape[1])
    p.group(gid).slices.append(ParamSlice(node.name, 1, 1, Role.FLAT))
    p.group(gid).nodes.append(node.name)


def gemm(p: Propagator, node: ir.Node) -> None:
    out = node.outputs[0]
    w = const_array(node.inputs[1])
    if w is None or p.track(out).get(1):
        return
    trans_b = attr(node, "transB", 0)
    gid = p.new_group(node, out, 1, w.shape[0] if trans_b else w.shape[1])
    g = p.group(gid)
    g.slices.append(ParamSlice(node.name, 1, 0 if trans_b else 1, Role.FLAT))
    g.nodes.append(node.name)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        if c is None:
            g.stop(f"Gemm '{node.name}' has a run-time bias")
        elif c.ndim >= 1 and c.shape[-1] == g.width and g.width > 1:
            g.slices.append(ParamSlice(node.name, 2, c.ndim - 1, Role.FLAT))


def ort_attention(p: Propagator, node: ir.Node) -> None:
    """onnxruntime's fused ``Attention`` (com.microsoft), what its BERT optimizer writes:

        x --Attention(W_qkv [C, q+k+v], b_qkv, mask, num_heads=H)--> ctx [B, S, v] --MatMul(W_o)

    The projections, the per-head attention and the head merge are one node: it starts the
    heads' group on its output (head size v/H), its packed weight's and bias' Q, K and V column
    windows are sliced alike, and ``num_heads`` (and ``qkv_hidden_sizes``) shrink with the heads.
    """
    out = node.outputs[0]
    w, heads = const_array(node.inputs[1]), attr(node, "num_heads", 0)
    if w is None or w.ndim != 2 or not heads or p.track(out).get(2):
        return
    sizes = list(attr(node, "qkv_hidden_sizes", None) or [w.shape[1] // 3] * 3)
    gid = p.new_group(node, out, len(p.probe[out.name].shape) - 1, sizes[2])
    g = p.group(gid)
    g.nodes.append(node.name)
    g.unit_size, g.has_head = sizes[2] // heads, True
    if len(set(sizes)) != 1 or sum(sizes) != w.shape[1] or sizes[2] % heads:
        g.stop(f"Attention '{node.name}' has Q/K/V widths {sizes} for {heads} heads: "
                          f"heads of different sizes")
    g.attr_edits.append(AttrEdit(node.name, "num_heads", Role.HEAD))
    if attr(node, "qkv_hidden_sizes", None) is not None:
        g.attr_edits += [AttrEdit(node.name, "qkv_hidden_sizes", Role.FLAT, i) for i in range(3)]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and const_array(bias) is None:
        g.stop(f"Attention '{node.name}' has a run-time bias")
    for offset in np.cumsum([0] + sizes[:2]):
        g.slices.append(ParamSlice(node.name, 1, 1, Role.FLAT, offset=int(offset)))
        if bias is not None:
            g.slices.append(ParamSlice(node.name, 2, 0, Role.FLAT, offset=int(offset)))
    why = heads_axis_inputs(p, node, bias=5, past=(4,))
    if why is None and len(node.outputs) > 1 and node.outputs[1] is not None and \
            (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        why = "a present key/value state: not pruned through yet"
    if why is not None:
        g.stop(f"Attention '{node.name}': {why}")
