"""Ops that move, split, merge or read axes without computing on them: Transpose, Reshape,
(Un)Squeeze, Flatten, Slice, and Shape reads of a tracked tensor (Expand and Tile, which repeat
a tensor along axes: :mod:`.repeat`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
import numpy as np

from optin_onnx.analysis.groups import Track
from optin_onnx.analysis.shapes import (ConstElement, DimElement, shape_reads,
                                        trace_element)
from optin_onnx.analysis.structure import Role, ShapeEdit
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

def transpose(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    perm = attr(node, "perm", None) or list(reversed(range(rank)))
    p.tracks[node.outputs[0].name] = {o: t[i] for o, i in enumerate(perm) if i in t}


def _prod(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def reshape(p: Propagator, node: ir.Node) -> None:
    data, target = node.inputs[0], node.inputs[1]
    t = p.track(data)
    if p.track(target):
        return p.barrier_all(p.track(target), f"Reshape '{node.name}' shape depends on the axis")
    si, so = p.shape(data), p.shape(node.outputs[0])
    out: Track = {}
    folds: dict[int, int] = {}  # output axis -> positions folded into it after each channel
    leads: dict[int, int] = {}  # output axis -> batch-like factor folded into it before the units
    groups: dict[int, int] = {}  # output axis -> sub-units per unit (grouped-query heads)
    merged_inner: set[int] = set()
    for a in sorted(t):
        gid, role = t[a]
        if a in merged_inner:
            continue
        pre, n = _prod(si[:a]), si[a]
        ks = [k for k in range(len(so)) if _prod(so[:k]) == pre]
        nxt = t.get(a + 1)
        lead = p.lead.get((data.name, a), 1)
        grouping = p.group_of(data, a)
        if lead > 1:
            # A folded (batch x units) axis: kept whole, or split back into its factors.
            k = next((k for k in ks if so[k] == n), None)
            if k is not None:
                out[k], leads[k], groups[k] = (gid, role), lead, grouping
                continue
            m = _unfold(si, so, a, lead, ks)
            if m is None:
                return p.barrier(gid, f"Reshape '{node.name}' splits a folded (batch x units) "
                                      f"axis other than back into its factors "
                                      f"({list(si)} -> {list(so)})")
            out[m], groups[m] = (gid, role), grouping
            continue
        if role is Role.HEAD and nxt is not None and nxt[1] is Role.INNER and \
                p.find(nxt[0]) == p.find(gid) and any(so[k] == n * si[a + 1] for k in ks):
            k = next(k for k in ks if so[k] == n * si[a + 1])
            out[k], groups[k] = (gid, Role.FLAT), grouping
            merged_inner.add(a + 1)
        elif any(so[k] == n for k in ks):
            k = next(k for k in ks if so[k] == n)
            out[k], groups[k] = (gid, role), grouping
        elif role is not Role.INNER and _lead_fold(si, so, a, t) is not None:
            k, f = _lead_fold(si, so, a, t)
            out[k], leads[k], groups[k] = (gid, role), f, grouping
        elif role is Role.HEAD and _folds(si, so, a, t, ks) is not None:
            # [B, KV, n_rep, S, D] -> [B, KV * n_rep, S, D] (repeat_kv after an Expand): each
            # key/value head now serves n_rep query-head positions.
            k, r = _folds(si, so, a, t, ks)
            out[k], groups[k] = (gid, role), grouping * r
        elif role is Role.FLAT and _folds(si, so, a, t, ks) is not None:
            k, r = _folds(si, so, a, t, ks)
            out[k], groups[k] = (gid, role), grouping
            folds[k] = r
        elif role is Role.FLAT and any(k + 1 < len(so) and so[k] * so[k + 1] == n for k in ks):
            k = next(k for k in ks if k + 1 < len(so) and so[k] * so[k + 1] == n)
            g = p.group(gid)
            if g.unit_size is None:
                g.unit_size = so[k + 1]
            elif g.unit_size != so[k + 1]:
                g.stop(f"Reshape '{node.name}' splits units of {so[k + 1]}, "
                                  f"elsewhere {g.unit_size}")
            g.has_head = True
            out[k], out[k + 1] = (gid, Role.HEAD), (gid, Role.INNER)
            groups[k] = grouping
        else:
            return p.barrier(gid, f"Reshape '{node.name}' mixes the axis with others "
                                f"({list(si)} -> {list(so)})")
    allow_zero = attr(node, "allowzero", 0)
    for k, (gid, role) in out.items():
        if role is Role.INNER:
            continue
        elem = trace_element(target, k, p.probe)
        if isinstance(elem, ConstElement):
            if elem.value == -1:
                continue
            same = t.get(k)
            if elem.value == 0 and not allow_zero and same is not None and same[1] is role and \
                    p.find(same[0]) == p.find(gid):
                continue
            if elem.value == so[k] and k not in leads and elem.editable:
                p.group(gid).shape_edits.append(ShapeEdit(node.name, (1,) + elem.path, elem.offset,
                                                          role, folds.get(k, 1),
                                                          group=groups.get(k, 1)))
                continue
        elif isinstance(elem, DimElement) and elem.divisor is None:
            src = p.tracks.get(elem.value, {}).get(elem.axis)
            if src is not None and p.find(src[0]) == p.find(gid) and src[1] is role and \
                    p.lead.get((elem.value, elem.axis), 1) == leads.get(k, 1) and \
                    p.grouping.get((elem.value, elem.axis), 1) * elem.scale == groups.get(k, 1):
                continue
        return p.barrier(gid, f"Reshape '{node.name}': cannot prove where element {k} of its "
                            f"target shape comes from")
    if not untracked_sizes_proved(p, node, target, out, len(so)):
        return
    p.proved.add(node.name)
    p.tracks[node.outputs[0].name] = out
    for k, r in folds.items():
        p.repeat[(node.outputs[0].name, k)] = r
    for k, f in leads.items():
        p.lead[(node.outputs[0].name, k)] = f
    for k, g in groups.items():
        if g > 1 and out[k][1] is not Role.INNER:
            p.grouping[(node.outputs[0].name, k)] = g


def _lead_fold(si, so, a: int, t: Track) -> tuple[int, int] | None:
    """(output axis, lead) when input axis ``a`` and the untracked axes right before it become one
    output axis, the units innermost (torchlib builds K^T as ``[B, H, S, D] -> [B*H, S, D]``):
    element ``b * units + u`` then belongs to unit ``u`` of batch row ``b``."""
    for j in range(a - 1, -1, -1):
        if j in t:
            return None
        lead = _prod(si[j:a])
        for k in range(len(so)):
            if _prod(so[:k]) == _prod(si[:j]) and so[k] == lead * si[a]:
                return (k, lead) if lead > 1 else None
    return None


def _unfold(si, so, a: int, lead: int, ks: list[int]) -> int | None:
    """The output axis that gets the units back when a folded axis (``lead`` x units) is split
    into its factors, ``[B*H, D, S] -> [B, H, D, S]``: the output axes from one in ``ks`` multiply
    to ``lead`` and the next one holds the units."""
    units = si[a] // lead
    for k in ks:
        m, f = k, 1
        while m < len(so) and f < lead:
            f *= so[m]
            m += 1
        if f == lead and m < len(so) and so[m] == units:
            return m
    return None


def _folds(si, so, a: int, t: Track, ks: list[int]) -> tuple[int, int] | None:
    """(output axis, repeat) when input axis ``a`` and the untracked axes right after it become one
    output axis (``x.view(N, -1)`` of an NCHW map): channel c then owns ``repeat`` elements."""
    for k in ks:
        r, j = 1, a + 1
        while j < len(si) and j not in t and so[k] > si[a] * r:
            r *= si[j]
            j += 1
        if r > 1 and so[k] == si[a] * r:
            return k, r
    return None


def shape(p: Propagator, node: ir.Node) -> None:
    """Shape of a pruned tensor is harmless where it is cut down at once to axes that pruning
    leaves unchanged: untracked axes (onnxsim writes ``Slice(Shape(x), 0, -1)`` to rebuild
    leading dims after a Gemm) and the inner axis of a unit (the TorchScript SDPA export reads
    head_dim as ``Gather(Shape(q), 3)`` to build a Reshape target and the softmax scale)."""
    t = p.track(node.inputs[0])
    for user, picked in shape_reads(node, len(p.shape(node.inputs[0]))):
        pruned = {t[int(a)][0] for a in (() if picked is None else picked)
                  if int(a) in t and t[int(a)][1] is not Role.INNER}
        targets = _size_targets(user.outputs[0]) if pruned else set()
        if picked is None or targets is None:
            return p.barrier_all(t, f"Shape '{node.name}' of the pruned tensor is used by "
                                  f"{user.op_type} '{user.name}'")
        for name in targets:
            p.unproved.setdefault(name, []).append((node.name, pruned))


#: Ops that only move elements of a shape tensor around, scale them by a constant or pick them
#: (torch's expand(-1) handling: ``Where(Equal(t, -1), ones, t)``): what :func:`trace_element`
#: follows.
_INDEX_OPS = {"Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Gather", "Slice", "Mul",
              "Div", "Equal", "Where", "Reshape"}


def _moves_elements(node: ir.Node, slot: int) -> bool:
    """True when input ``slot`` of ``node`` reaches its output only as elements that
    :func:`trace_element` follows: data (not indices) of Gather/Slice, a Mul by a constant, the
    Equal/Where of torch's expand(-1) handling, a Reshape's data."""
    op = node.op_type
    if op in ("Gather", "Slice", "Reshape"):
        return slot == 0
    if op == "Mul":
        return const_array(node.inputs[1 - slot]) is not None
    if op == "Div":  # a folded axis' batch: ``Div(B*H, H)``
        return slot == 0 and const_array(node.inputs[1]) is not None
    if op == "Equal":  # only as the condition of a Where: a bool, never a size
        return all(u.node.op_type == "Where" and u.idx == 0 for u in node.outputs[0].uses())
    if op == "Where":
        return slot in (0, 2)
    return True


def _size_targets(value: ir.Value, depth: int = 0) -> set[str] | None:
    """The Reshapes and Expands whose target, and the Tiles whose repeats, every use of ``value``
    ends in, through ops that only move shape elements; None where a use ends elsewhere. Each of
    them must prove every element it takes from a pruned axis (its handler, which runs only
    where its data is pruned too, or :func:`.repeat.broadcast_along` for an index); what none proves
    is a barrier at the end of the pass (torchlib rebuilds ``[B, H, D, S]`` from
    ``Slice(Shape(k), 0, 2)`` after transposing K)."""
    if depth > 16 or value.is_graph_output():
        return None
    out: set[str] = set()
    for use in value.uses():
        user = use.node
        if user.op_type in ("Reshape", "Expand", "Tile") and use.idx == 1:
            out.add(user.name)
            continue
        if user.op_type == "Shape":
            continue  # the length of a shape vector
        if user.op_type not in _INDEX_OPS or not _moves_elements(user, use.idx):
            return None
        for o in user.outputs:
            inner = _size_targets(o, depth + 1)
            if inner is None:
                return None
            out |= inner
    return out


def untracked_sizes_proved(p: Propagator, node: ir.Node, target: ir.Value, out: Track,
                            rank: int) -> bool:
    """An axis that stays out of every group must not take its size from a pruned one (a shape
    read of a pruned axis is allowed only into targets that this check covers); False after
    marking the barrier."""
    for k in range(rank):
        if k in out:
            continue
        elem = trace_element(target, k, p.probe)
        src = p.tracks.get(elem.value, {}).get(elem.axis) if isinstance(elem, DimElement) else None
        if src is not None and src[1] is not Role.INNER:
            p.barrier(src[0], f"{node.op_type} '{node.name}' sizes an untracked axis from the "
                              f"pruned axis of '{elem.value}'")
            return False
    return True


def slice_(p: Propagator, node: ir.Node) -> None:
    """Slicing other axes keeps the channel axes; slicing the inner axis of a unit is harmless
    (rotary embeddings rotate halves of head_dim: ``Slice(q, 0, D/2, axes=[-1])``, the bounds
    often read from ``Shape(q)`` at run time). Slicing a channel axis itself is a barrier: fused
    projections split by Slices are split back before the analysis (see ``passes``)."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        if v is not None:
            p.barrier_all(p.track(v), f"Slice '{node.name}' takes the axis as a bound")
    rank = len(p.shape(node.inputs[0]))
    if len(node.inputs) > 1:  # opset 10+: starts, ends, axes?, steps?
        axes_v = node.inputs[3] if len(node.inputs) > 3 else None
        n = np.size(p.probe[node.inputs[1].name]) if node.inputs[1].name in p.probe else \
            np.size(const_array(node.inputs[1]))
        axes = p.static(axes_v) if axes_v is not None else np.arange(n)
    else:
        axes = attr(node, "axes", None)
        axes = np.arange(len(attr(node, "starts", []))) if axes is None else axes
    if axes is None:
        return p.barrier_all(t, f"Slice '{node.name}' has run-time axes")
    p.keep_unless_on(node, {int(a) % rank for a in np.reshape(axes, -1)}, "slices the channel axis")


def unsqueeze(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    out_rank = len(p.shape(node.outputs[0]))
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes")
    inserted = sorted(int(a) % out_rank for a in np.reshape(axes, -1))
    kept = [o for o in range(out_rank) if o not in inserted]
    p.tracks[node.outputs[0].name] = {kept[a]: v for a, v in t.items()}


def squeeze(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    in_shape = p.shape(node.inputs[0])
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "axes")
    removed = ({int(a) % len(in_shape) for a in np.reshape(axes, -1)} if axes is not None
               else {a for a, d in enumerate(in_shape) if d == 1})
    kept = [a for a in range(len(in_shape)) if a not in removed]
    p.tracks[node.outputs[0].name] = {kept.index(a): v for a, v in t.items() if a in kept}


def flatten(p: Propagator, node: ir.Node) -> None:
    """[N, C, H, W] -> [N, C*H*W] (axis 1): the channel axis survives with a repeat of H*W."""
    t = p.track(node.inputs[0])
    si = p.shape(node.inputs[0])
    k = attr(node, "axis", 1) % (len(si) or 1)
    out: Track = {}
    for a, (gid, role) in t.items():
        lead, rest = (si[:a], si[a + 1:k]) if a < k else (si[k:a], si[a + 1:])
        if _prod(lead) != 1 or role is not Role.FLAT and _prod(rest) != 1:
            return p.barrier(gid, f"Flatten '{node.name}' mixes the axis with others")
        o = 0 if a < k else 1
        out[o] = (gid, role)
        if _prod(rest) > 1:
            p.repeat[(node.outputs[0].name, o)] = _prod(rest)
    p.tracks[node.outputs[0].name] = out
