"""Ops that repeat a tensor along axes: Expand (``repeat_kv`` of grouped-query attention, a
broadcast index) and Tile (a heads axis repeated over the batch, DeBERTa's position table), with
the run-time sizes and counts they take, each proved to follow the pruned axis or to stay
unchanged by pruning."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.groups import Track
from optin_onnx.analysis.handlers.layout import untracked_sizes_proved
from optin_onnx.analysis.shapes import ConstElement, DimElement, trace_element
from optin_onnx.analysis.structure import Role, ShapeEdit
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator


def expand(p: Propagator, node: ir.Node) -> None:
    """Broadcasting along other axes keeps the channel axes (``repeat_kv`` of grouped-query
    attention: ``[B, KV, 1, S, D] -> [B, KV, n_rep, S, D]``). The target's element on a pruned
    axis must be 1 (keep the input's size: a constant, or torch's ``ConstantOfShape`` of ones) or
    the axis' size after pruning (:func:`sizes_axis`); no other axis may take its size from a
    pruned one."""
    data, target = node.inputs[0], node.inputs[1]
    if p.track(target):
        return p.barrier_all(p.track(target), f"Expand '{node.name}' shape depends on the axis")
    t = p.track(data)
    si, so = p.shape(data), p.shape(node.outputs[0])
    shift = len(so) - len(si)
    out: Track = {}
    for a, (gid, role) in t.items():
        k = a + shift
        if si[a] != so[k]:
            return p.barrier(gid, f"Expand '{node.name}' broadcasts the axis")
        out[k] = (gid, role)
        if role is Role.INNER:
            continue
        elem = trace_element(target, k, p.probe)
        if isinstance(elem, ConstElement) and elem.value == 1 or \
                sizes_axis(p, node, k, gid, role, p.lead.get((data.name, a), 1),
                           p.group_of(data, a), so[k]):
            continue
        return p.barrier(gid, f"Expand '{node.name}': cannot prove where element {k} of its "
                              f"target shape comes from")
    if untracked_sizes_proved(p, node, target, out, len(so)):
        p.proved.add(node.name)
        p.tracks[node.outputs[0].name] = out


def sizes_axis(p: Propagator, node: ir.Node, k: int, gid: int, role: Role, lead: int,
               grouping: int, size: int, via: tuple[str, tuple[int, ...]] | None = None) -> bool:
    """True when element ``k`` of ``node``'s target (input 1 of an Expand) is, after pruning, the
    size of an axis of group ``gid`` (``role``, folded ``lead`` x units, ``grouping`` sub-units
    per unit), recording the edit that keeps it so: a constant of that size (edited with the kept
    units; never on a folded axis, whose batch is not a constant), the same axis read at run time,
    or the batch read at run time times a constant unit count (dynamo's ``H * B`` for a folded
    axis; the constant edited).

    ``via``: (node, input slots) from a use of ``node``'s output back to ``node``, where the edit
    starts so that this use gets private copies (dynamo computes DeBERTa's position index once
    for every layer, each keeping its own heads); a run-time read then proves the size only for
    a ``node`` with that one use."""
    start, prefix = via or (node.name, ())
    elem = trace_element(node.inputs[1], k, p.probe)
    if isinstance(elem, ConstElement):
        if lead == 1 and elem.editable and elem.value == size:
            p.group(gid).shape_edits.append(ShapeEdit(start, prefix + (1,) + elem.path,
                                                      elem.offset, role, group=grouping))
            return True
        return False
    if not isinstance(elem, DimElement) or elem.divisor is not None:
        return False
    src = p.tracks.get(elem.value, {}).get(elem.axis)
    if src is not None:
        return p.find(src[0]) == p.find(gid) and src[1] is role and \
            p.lead.get((elem.value, elem.axis), 1) == lead and \
            p.grouping.get((elem.value, elem.axis), 1) * elem.scale == grouping and \
            (via is None or len(node.outputs[0].uses()) == 1)
    batch = p.probe.get(elem.value)
    if lead > 1 and role is Role.HEAD and elem.factor is not None and batch is not None and \
            np.shape(batch)[elem.axis] == lead and elem.scale * lead == size:
        f = elem.factor
        p.group(gid).shape_edits.append(ShapeEdit(start, prefix + (1,) + f.path, f.offset, role,
                                                  group=grouping))
        return True
    return False


def broadcast_along(p: Propagator, user: ir.Node, slot: int, a: int, gid: int, role: Role,
                    lead: int, grouping: int) -> bool:
    """True when axis ``a`` of the run-time value ``user.inputs[slot]`` holds identical slices
    sized, for this use, like an axis of group ``gid`` (:func:`sizes_axis`): an Expand of a
    tensor without that axis (size 1 or absent). Such an operand fits the pruned graph as it
    is: its size follows the kept units and whichever units are kept, it holds the same values
    (DeBERTa's relative-position index, ``[1, S, S]`` expanded to ``[B*H, S, S]``)."""
    v = user.inputs[slot]
    node = v.producer()
    if node is None or node.op_type != "Expand" or p.track(node.inputs[0]):
        return False
    si, so = p.shape(node.inputs[0]), p.shape(v)
    j = a - (len(so) - len(si))
    if (j < 0 or si[j] == 1) and \
            untracked_sizes_proved(p, node, node.inputs[1], {a: (gid, role)}, len(so)) and \
            sizes_axis(p, node, a, gid, role, lead, grouping, so[a], via=(user.name, (slot,))):
        p.proved.add(node.name)
        return True
    return False


def unchanged_count(p: Propagator, node: ir.Node, k: int) -> bool:
    """True when element ``k`` of ``node``'s input 1 (a Tile's repeats) keeps its value whatever
    units are pruned, recording the edit that keeps it so: a constant, a dimension of an axis no
    group prunes (the batch, a sequence, a unit's inner axis), or the batch of a folded (batch x
    units) axis read as its size divided by the unit count (TorchScript's DeBERTa: ``Div(B*H,
    H)``, H edited with the kept units)."""
    elem = trace_element(node.inputs[1], k, p.probe)
    if isinstance(elem, ConstElement):
        return True
    if not isinstance(elem, DimElement):
        return False
    src = p.tracks.get(elem.value, {}).get(elem.axis)
    if src is None or src[1] is Role.INNER:
        return True
    d = elem.divisor
    lead = p.lead.get((elem.value, elem.axis), 1)
    size = np.shape(p.probe[elem.value])[elem.axis]
    if d is None or lead == 1 or src[1] is not Role.HEAD or d.value * lead != size:
        return False
    p.group(src[0]).shape_edits.append(ShapeEdit(
        node.name, (1,) + d.path, d.offset, Role.HEAD,
        group=p.grouping.get((elem.value, elem.axis), 1)))
    return True


def _counts(p: Propagator, repeats: ir.Value) -> np.ndarray:
    """A Tile's repeats: a constant, or their probe values (read from shapes at run time)."""
    arr = const_array(repeats)
    return np.reshape(p.probe[repeats.name] if arr is None else arr, -1)


def tile(p: Propagator, node: ir.Node) -> None:
    """Tile repeats a tensor along its axes. Repeating a unit axis ``r`` times lays the copies out
    as element ``i * units + u``: a folded (batch x units) axis with lead ``r``, what a Reshape
    of ``[B, H, ..]`` to ``[B*H, ..]`` makes (DeBERTa's ``pos_key.repeat(B, 1, 1)`` of a
    ``[H, 2k, D]`` table, then multiplied with the folded queries). Every repeat must be a count
    pruning leaves unchanged (:func:`unchanged_count`)."""
    data, repeats = node.inputs[0], node.inputs[1]
    if p.track(repeats):
        return p.barrier_all(p.track(repeats), f"Tile '{node.name}' repeats depend on the axis")
    t = p.track(data)
    counts = _counts(p, repeats)
    out: Track = {}
    for k in range(len(counts)):
        if not unchanged_count(p, node, k):
            return p.barrier_all(t, f"Tile '{node.name}': cannot prove that repeat {k} is left "
                                    f"unchanged by pruning")
    for a, (gid, role) in t.items():
        out[a] = (gid, role)
        const = trace_element(repeats, a, p.probe)
        if isinstance(const, ConstElement) and const.value == 1:
            continue
        if role is not Role.HEAD or counts[a] < 2 or (data.name, a) in p.lead:
            return p.barrier(gid, f"Tile '{node.name}' repeats the axis other than as a batch of "
                                  f"whole units")
        p.lead[(node.outputs[0].name, a)] = int(counts[a])
    p.proved.add(node.name)
    p.tracks[node.outputs[0].name] = out


def tiled_constant(p: Propagator, v: ir.Value, a: int, lead: int) -> tuple[str, int, int] | None:
    """(node, input slot, axis) of a constant whose unit axis reaches axis ``a`` of ``v`` folded
    ``lead`` times by a Tile (through transposes): dynamo folds DeBERTa's position projections
    into a ``[H, 2k, D]`` table and tiles it to ``[B*H, 2k, D]``. Slicing the table's units at the
    Tile (a private copy for that use) slices every batch row alike. Only a chain whose values
    have no other use: the rest of the graph sees the dense table."""
    while len(v.uses()) == 1 and not v.is_graph_output() and (node := v.producer()) is not None:
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None) or list(reversed(range(len(p.shape(v)))))
            v, a = node.inputs[0], perm[a]
        elif node.op_type == "Tile" and not p.track(node.inputs[0]):
            counts = _counts(p, node.inputs[1])
            if int(counts[a]) != lead or const_array(node.inputs[0]) is None or \
                    not all(unchanged_count(p, node, k) for k in range(len(counts))):
                return None
            return node.name, 0, a
        else:
            return None
    return None
