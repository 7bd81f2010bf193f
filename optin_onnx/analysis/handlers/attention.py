"""The standard ONNX ``Attention`` op (opset 23), which the dynamo exporter writes for
scaled-dot-product attention at opset 23 and later:

    q [B, H, S, D] --+
    k [B, H, L, D] --Attention(is_causal, scale, ...)--> y [B, H, S, Dv]
    v [B, H, L, Dv] -+

or the same with 3-D inputs ``[B, S, H*D]`` and ``q_num_heads`` / ``kv_num_heads`` attributes.
In the 4-D form the head axis is a batch axis of the op, as of the two attention MatMuls it
replaces: Q, K and V are one heads group and ``y`` keeps it. In the 3-D form the op splits and
merges the heads itself: the three projections' groups join, unit size H*D / heads, and the head
count attributes shrink with the group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.analysis.handlers.ort_contrib import heads_axis_inputs
from optin_onnx.analysis.structure import AttrEdit, Role
from optin_onnx.graph import attr

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator


def attention(p: Propagator, node: ir.Node) -> None:
    qkv = list(node.inputs[:3])
    ranks = {len(p.shape(v) or ()) for v in qkv if v is not None}
    live = [(v, a, p.track(v)[a]) for v in qkv if v is not None for a in p.track(v)]
    for v in node.inputs:
        for gid, _ in p.track(v).values():
            p.group(gid).nodes.append(node.name)
    why = heads_axis_inputs(p, node, bias=3, past=(4, 5))
    for i, out in enumerate(node.outputs[1:], start=1):
        if why is None and out is not None and (out.uses() or out.is_graph_output()):
            why = "a present key/value state or the attention scores as outputs: not pruned " \
                  "through yet" if i < 3 else "its Q.K^T scores as an output: not pruned through yet"
    if why is None and (any(v is None for v in qkv) or ranks - {3, 4} or len(ranks) != 1):
        why = "Q/K/V of unexpected ranks"
    if why is None:
        rank = ranks.pop()
        why = _heads_4d(p, node, live) if rank == 4 else _heads_3d(p, node, live)
    if why is not None:
        for gid in {gid for _, _, (gid, _) in live}:
            p.barrier(gid, f"Attention '{node.name}': {why}")


def _heads_4d(p: Propagator, node: ir.Node, live) -> str | None:
    q, k, v = node.inputs[:3]
    hq, hk = p.shape(q)[1], p.shape(k)[1]
    if hq != hk:
        return f"grouped-query heads ({hq} query heads share {hk} key/value heads): not pruned " \
               f"through yet"
    heads = [p.track(x).get(1) for x in (q, k, v)]
    if any(h is None or h[1] is not Role.HEAD for h in heads) or \
            any(a not in (1, 3) for _, a, _ in live):
        return "Q, K and V are not all split into heads on axis 1"
    gid = heads[0][0]
    for h in heads[1:]:
        gid = p.union(gid, h[0])
    for x in (q, k):  # head_dim of Q and K is contracted inside each head, like Q.K^T
        inner = p.track(x).get(3)
        if inner is not None:
            gid = p.union(gid, inner[0])
    out = {1: (p.find(gid), Role.HEAD)}
    v_inner = p.track(v).get(3)
    if v_inner is not None:
        out[3] = (p.find(v_inner[0]), Role.INNER)
    p.tracks[node.outputs[0].name] = out
    return None


def _heads_3d(p: Propagator, node: ir.Node, live) -> str | None:
    q, k, v = node.inputs[:3]
    hq, hk = attr(node, "q_num_heads", 0), attr(node, "kv_num_heads", 0)
    if not hq or hq != hk:
        return f"grouped-query heads ({hq} query heads, {hk} key/value heads): not pruned through yet"
    tracks = [p.track(x).get(2) for x in (q, k, v)]
    if any(t is None or t[1] is not Role.FLAT for t in tracks) or len(live) != 3:
        return "Q, K and V are not all projections of their own"
    widths = [p.shape(x)[2] for x in (q, k, v)]
    if len(set(widths)) != 1 or widths[0] % hq:
        return f"Q/K/V widths {widths} for {hq} heads"
    gid = tracks[0][0]
    for t in tracks[1:]:
        gid = p.union(gid, t[0])
    g = p.group(gid)
    unit = widths[0] // hq
    if g.unit_size not in (None, unit):
        return f"units of {unit} here, {g.unit_size} elsewhere"
    g.unit_size, g.has_head = unit, True
    g.attr_edits += [AttrEdit(node.name, "q_num_heads", Role.HEAD),
                     AttrEdit(node.name, "kv_num_heads", Role.HEAD)]
    p.tracks[node.outputs[0].name] = {2: (p.find(gid), Role.FLAT)}
    return None
