"""Concat and Split of a channel axis: index mapping between a composite axis and its parts;
GatherElements, an index mapping along one axis and element-wise on the others."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
import numpy as np

from optin_onnx.analysis.groups import Track
from optin_onnx.analysis.handlers.repeat import broadcast_along
from optin_onnx.analysis.structure import Role, ShapeEdit
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

def concat(p: Propagator, node: ir.Node) -> None:
    """Concat along another axis keeps the channel axis, like a broadcasting op (a ViT's class
    token joins the patch tokens: a constant operand is sliced, a run-time one stops the group).
    Concat *along* the channel axes of several groups makes a composite axis: each group keeps
    its channels at an offset (see :meth:`Propagator.resolve`)."""
    rank = len(p.shape(node.outputs[0]))
    axis = attr(node, "axis", 0) % rank
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    out: Track = {}
    joined = [p.track(v).get(axis) for _, v in data]
    inner = [j for j in joined if j is not None and j[1] is Role.INNER]
    if inner and len(inner) == len([j for j in joined if j]):
        # Along the inner axis of a unit (rotary's rotate_half: Concat(-x2, x1) of head_dim
        # halves): pruning never changes it, whatever joins it.
        gid = inner[0][0]
        for j in inner[1:]:
            gid = p.union(gid, j[0])
        out[axis] = (p.find(gid), Role.INNER)
    elif any(joined):
        why = None
        if not all(joined):
            why = f"Concat '{node.name}' joins a channel group with an untracked tensor"
        elif any(r is not Role.FLAT or (v.name, axis) in p.repeat or p.group(g).unit_size not in
                 (None, 1) for (_, v), (g, r) in zip(data, joined)):
            why = f"Concat '{node.name}' joins groups of multi-channel units"
        if why:
            for j in joined:
                if j:
                    p.barrier(j[0], why)
            return
        parts, offset = [], 0
        for (_, v), (g, _) in zip(data, joined):
            parts.append((p.find(g), offset))
            offset += p.shape(v)[axis]
        out[axis] = (p.composite(parts, offset), Role.FLAT)
    for a in range(rank):
        if a != axis:
            p.merge_axis(node, [(i, v, a) for i, v in data], a, out)
    if out:
        p.tracks[node.outputs[0].name] = out


def split(p: Propagator, node: ir.Node) -> None:
    """Split along another axis keeps the channel axis in every piece. Split *of* a channel axis
    cuts the group into windows: each output gets a group of its own, and the split group becomes
    a composite of those windows (what its producers and earlier readers recorded is handed to
    the windows at their offsets, as for a Concat); the window sizes are edited with the kept
    channels."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"Split '{node.name}' takes the axis as a parameter")
    axis = attr(node, "axis", 0) % len(p.shape(node.inputs[0]))
    if axis not in t:
        for out in node.outputs:
            if out is not None:
                p.tracks[out.name] = dict(t)
        return
    gid, role = t[axis]
    g = p.group(gid)
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else None
    why = None
    if sizes is None:
        why = "without a constant sizes input"
    elif role is not Role.FLAT or g.unit_size not in (None, 1) or \
            (node.inputs[0].name, axis) in p.repeat:
        why = "of multi-channel units"
    elif g.parts:
        why = "of a Concat's output"
    elif len(t) > 1:
        why = "of a tensor with other pruned axes"
    if why:
        return p.barrier(gid, f"Split '{node.name}' of a channel axis {why}")
    parts, offset = [], 0
    for i, (out, size) in enumerate(zip(node.outputs, np.reshape(sizes, -1))):
        w = p.composite([], int(size))  # a plain group with no source: the window
        p.groups[w].shape_edits.append(ShapeEdit(node.name, (1,), i, Role.FLAT))
        parts.append((w, offset))
        offset += int(size)
        if out is not None:
            p.tracks[out.name] = {axis: (w, Role.FLAT)}
    g.parts, g.unit_size = parts, 1


def gather_elements(p: Propagator, node: ir.Node) -> None:
    """``out[.., i, ..] = data[.., index[.., i, ..], ..]`` along ``axis``: on every other axis the
    op is element-wise (output position i reads data and index at i), so a unit axis there is
    kept when the index fits every unit alike: tracked on the same axis (merged like any
    element-wise operand), or a broadcast along it sized at run time from the same axis
    (:func:`broadcast_along`: DeBERTa's relative positions, ``[1, S, S]`` expanded to the folded
    ``[B*H, S, S]`` of the scores; its slices are identical, so the pruned graph's index, sized
    from the kept heads, picks the same elements). An index whose values may differ per unit
    (any other run-time index) is a barrier. Along ``axis`` itself the output takes the index's
    positions: gathering along a unit axis is a barrier, along the inner axis harmless."""
    data, index = node.inputs[0], node.inputs[1]
    rank = len(p.shape(data))
    axis = attr(node, "axis", 0) % rank
    td, ti = p.track(data), p.track(index)
    if axis in ti:
        return p.barrier(ti[axis][0], f"GatherElements '{node.name}' indexes with the axis")
    if axis in td and td[axis][1] is not Role.INNER:
        return p.barrier(td[axis][0], f"GatherElements '{node.name}' gathers along the axis")
    out: Track = {}
    for a in range(rank):
        if a == axis:
            continue
        if a in td and a not in ti and td[a][1] is not Role.INNER:
            gid, role = td[a]
            if not broadcast_along(p, node, 1, a, gid, role, p.lead.get((data.name, a), 1),
                                   p.group_of(data, a)):
                return p.barrier(gid, f"GatherElements '{node.name}' reads the axis with index "
                                      f"'{index.name}', which is not a broadcast along it sized "
                                      f"from it: its values may differ per unit")
            out[a] = (gid, role)
        elif a in td and a not in ti:
            if p.shape(index)[a] == p.shape(data)[a]:
                out[a] = td[a]  # the inner axis: never pruned, any index fits
        else:
            p.merge_axis(node, [(0, data, a), (1, index, a)], a, out)
    if out:
        p.tracks[node.outputs[0].name] = out
