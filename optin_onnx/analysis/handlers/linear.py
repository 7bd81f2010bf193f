"""Matrix products: MatMul and Gemm carry batch axes, and contracting a channel axis against a
constant weight ends a group (a *consumer*)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.analysis.groups import Track
from optin_onnx.analysis.structure import Consumer, ParamSlice, Role
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

def matmul(p: Propagator, node: ir.Node) -> None:
    a_v, b_v = node.inputs[0], node.inputs[1]
    ta, tb = p.track(a_v), p.track(b_v)
    sa, sb, so = p.shape(a_v), p.shape(b_v), p.shape(node.outputs[0])
    ra, rb, ro = len(sa), len(sb), len(so)
    if ra < 2 or rb < 2:
        p.barrier_all(ta, f"MatMul '{node.name}' with a 1-D operand")
        return p.barrier_all(tb, f"MatMul '{node.name}' with a 1-D operand")
    out: Track = {}
    inner: tuple[int, int] | None = None
    ka, kb = ta.get(ra - 1), tb.get(rb - 2)
    weight = const_array(b_v)
    folded = [a for a in ta if a != ra - 1 and (a_v.name, a) in p.repeat]
    if folded:
        return p.barrier(ta[folded[0]][0], f"MatMul '{node.name}' reads a flattened axis as rows")
    for v, a in ((a_v, ra - 1), (b_v, rb - 2)):
        if (v.name, a) in p.lead:
            return p.barrier(p.track(v)[a][0], f"MatMul '{node.name}' contracts a folded (batch x "
                                               f"units) axis")
    if ka is not None:
        gid, role = ka
        if weight is not None:
            if role is not Role.INNER:
                g = p.group(gid)
                r, k = p.repeat.get((a_v.name, ra - 1), 1), p.group_of(a_v, ra - 1)
                g.consumers.append(Consumer(node.name, 0, ra - 1, 1, rb - 2, role, r, group=k))
                p.mac_axes.append((node.name, gid, "in"))
                g.slices.append(ParamSlice(node.name, 1, rb - 2, role, r, group=k))
        elif kb is not None and kb[1] is Role.INNER and role is Role.INNER:
            # Q.K^T: a contraction inside each head couples Q and K; joined after the batch
            # (head) axes, whose merge learns how many query heads share a key head.
            inner = (gid, kb[0])
        elif not (kb is None and role is Role.INNER and _table(b_v)):
            # A table (dynamo's DeBERTa position keys: constants tiled to the batch) may meet a
            # head's inner axis: its head axis is sliced where the batch axes merge.
            return p.barrier(gid, f"MatMul '{node.name}' contracts the axis with a run-time tensor")
    elif kb is not None:
        return p.barrier(kb[0], f"MatMul '{node.name}' contracts the axis with a run-time tensor")
    if ra - 2 in ta:
        out[ro - 2] = ta[ra - 2]
    if rb - 1 in tb:
        out[ro - 1] = tb[rb - 1]
    for o in range(ro - 2):
        entries = [(0, a_v, o - (ro - ra))] if o - (ro - ra) >= 0 else []
        if o - (ro - rb) >= 0:
            entries.append((1, b_v, o - (ro - rb)))
        p.merge_axis(node, entries, o, out)
    if inner is not None:
        p.union(*inner)
    if out:
        p.tracks[node.outputs[0].name] = out


def gemm(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"Gemm '{node.name}' takes the axis as a weight or bias")
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    k_axis = 0 if trans_a else 1
    weight = const_array(node.inputs[1])
    for axis, (gid, role) in t.items():
        if axis != k_axis or weight is None or role is Role.INNER:
            p.barrier(gid, f"Gemm '{node.name}' uses the axis as rows or with a run-time weight")
            continue
        w_axis = 1 if trans_b else 0
        g = p.group(gid)
        r, k = p.repeat.get((node.inputs[0].name, axis), 1), p.group_of(node.inputs[0], axis)
        g.consumers.append(Consumer(node.name, 0, k_axis, 1, w_axis, role, r, group=k))
        p.mac_axes.append((node.name, gid, "in"))
        g.slices.append(ParamSlice(node.name, 1, w_axis, role, r, group=k))


def _table(v: ir.Value, depth: int = 0) -> bool:
    """True when ``v`` is computed from constants and tensor sizes alone: its values depend on no
    pruned tensor (a position table tiled to the batch), only its layout may."""
    if const_array(v) is not None:
        return True
    node = v.producer()
    if node is None or depth > 16:
        return False
    if node.op_type == "Shape":
        return True
    return all(i is None or _table(i, depth + 1) for i in node.inputs)
