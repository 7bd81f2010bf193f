"""The standard ONNX ``Attention`` op (opset 23), which the dynamo exporter writes for
scaled-dot-product attention at opset 23 and later:

    q [B, H, S, D] --+
    k [B, H, L, D] --Attention(is_causal, scale, ...)--> y [B, H, S, Dv]
    v [B, H, L, Dv] -+

or the same with 3-D inputs ``[B, S, H*D]`` and ``q_num_heads`` / ``kv_num_heads`` attributes.
In the 4-D form the head axis is a batch axis of the op, as of the two attention MatMuls it
replaces: Q, K and V are one heads group and ``y`` keeps it. In the 3-D form the op splits and
merges the heads itself: the three projections' groups join, unit size H*D / heads, and the head
count attributes shrink with the group. With fewer key/value heads than query heads (grouped-query
attention) a unit is one key/value head with the query heads that read it, as for the unfused
form; a past key/value input and present output (``[B, kv heads, length, D]``) are cache ports.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.analysis.handlers.ort_contrib import cache_ports, heads_axis_inputs, joined_heads
from optin_onnx.analysis.structure import Role
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
    why = heads_axis_inputs(p, node, bias=3, past=())
    scores = node.outputs[3] if len(node.outputs) > 3 else None
    if why is None and scores is not None and (scores.uses() or scores.is_graph_output()):
        why = "its Q.K^T scores as an output: not pruned through yet"
    if why is None and (any(v is None for v in qkv) or ranks - {3, 4} or len(ranks) != 1):
        why = "Q/K/V of unexpected ranks"
    if why is None:
        rank = ranks.pop()
        why = _heads_4d(p, node, live) if rank == 4 else _heads_3d(p, node, live)
    if why is None:
        why = cache_ports(p, node, p.track(node.outputs[0]).get(1 if rank == 4 else 2)[0],
                          ((4, 1), (5, 2)))
        if why is not None:
            p.tracks.pop(node.outputs[0].name, None)
    if why is not None:
        for gid in {gid for _, _, (gid, _) in live}:
            p.barrier(gid, f"Attention '{node.name}': {why}")


def _heads_4d(p: Propagator, node: ir.Node, live) -> str | None:
    q, k, v = node.inputs[:3]
    hq, hk = p.shape(q)[1], p.shape(k)[1]
    if hq % hk:
        return f"{hq} query heads over {hk} key/value heads"
    heads = [p.track(x).get(1) for x in (q, k, v)]
    if any(h is None or h[1] is not Role.HEAD for h in heads) or \
            any(a not in (1, 3) for _, a, _ in live):
        return "Q, K and V are not all split into heads on axis 1"
    if any(p.group_of(x, 1) != 1 for x in (q, k, v)):
        return "Q, K or V heads already grouped"
    n_rep = hq // hk
    if n_rep > 1:  # query heads h*n_rep .. h*n_rep + n_rep - 1 read key/value head h
        p.regroup(heads[0][0], n_rep)
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
    if n_rep > 1:
        p.grouping[(node.outputs[0].name, 1)] = n_rep
    return None


def _heads_3d(p: Propagator, node: ir.Node, live) -> str | None:
    hq, hk = attr(node, "q_num_heads", 0), attr(node, "kv_num_heads", 0)
    if any(p.track(x).keys() - {2} for x in node.inputs[:3]) or len(live) != 3:
        return "Q, K and V are not all projections of their own"
    return joined_heads(p, node, "q_num_heads", hq, hk)
