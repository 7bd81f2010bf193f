"""Where does one element of a run-time shape tensor come from?

Exporters build Reshape targets in three ways, and head pruning must handle all of them:

    constant          Reshape(x, [0, 0, 12, 64])
    Concat of pieces  Reshape(x, Concat(Unsqueeze(Gather(Shape(h), 0)), ..., [12], [64]))
    inferred          Reshape(x, [b, s, -1, 64])
    counted           Expand(i, Concat(Mul(12, batch), ...)), Tile(t, Concat(Div(Gather(Shape(q), 0), 12), ..))

:func:`trace_element` follows one element back through the small integer ops that build shapes
(Concat, Gather, Slice, Unsqueeze, Squeeze, Cast, Identity, Shape, a Mul or Div by a constant,
ConstantOfShape) and answers either "a constant, at offset k of the tensor feeding this node input"
(rewritable per use, unless a ConstantOfShape fill), or "dimension a of tensor t" (it follows t),
times or divided by a constant whose place it keeps (a unit count the rewrite may have to edit: the
batch x heads of a folded axis is ``B * H``, its batch ``B*H / H``), or unknown (anything else: the
caller must treat it as a barrier).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.graph import attr, const_array


@dataclass(frozen=True)
class ConstElement:
    path: tuple[int, ...]  # input slots followed from the start use down to the constant
    offset: int  # flat offset inside that constant
    value: int
    # False for a ConstantOfShape fill (torch's ``expand`` of ones): its value holds whatever the
    # shape, but no per-use edit can reach it.
    editable: bool = True


@dataclass(frozen=True)
class DimElement:
    value: str  # the tensor whose dimension this is
    axis: int
    scale: int = 1  # the dimension times this constant (repeat_kv's ``num_key_value_heads * n_rep``)
    # Where ``scale`` is one Mul's constant: its place (dynamo's ``H * B`` of a folded batch x
    # heads axis, H to edit when heads are pruned).
    factor: ConstElement | None = None
    # The dimension divided by this constant (TorchScript's batch from a folded axis:
    # ``Div(B*H, H)``, H to edit); the element is then ``dim / divisor.value``, not the dimension.
    divisor: ConstElement | None = None


Element = ConstElement | DimElement | None


def _length(value: ir.Value, probe: dict[str, np.ndarray]) -> int | None:
    arr = const_array(value)
    if arr is None:
        arr = probe.get(value.name)
    return None if arr is None else int(np.asarray(arr).size)


def trace_element(value: ir.Value, index: int, probe: dict[str, np.ndarray],
                  path: tuple[int, ...] = ()) -> Element:
    """Trace element ``index`` of the 1-D (or 0-D) integer tensor ``value``.

    ``path`` lists the input slots followed so far from the starting use; a constant is reported
    with its full path so the rewrite can clone every shared node on it and give the constant a
    private copy (a Concat shared by every layer must not be edited in place).
    """
    if len(path) > 32:
        return None
    arr = const_array(value)
    if arr is not None:
        flat = np.asarray(arr).reshape(-1)
        if index >= flat.size:
            return None
        return ConstElement(path, index, int(flat[index]))
    node = value.producer()
    if node is None:
        return None
    op = node.op_type
    if op in ("Cast", "Identity"):
        return trace_element(node.inputs[0], index, probe, path + (0,))
    if op in ("Unsqueeze", "Squeeze"):
        # A scalar <-> [1] change of rank: element 0 stays element 0.
        return trace_element(node.inputs[0], index, probe, path + (0,))
    if op == "Concat":
        offset = index
        for i, piece in enumerate(node.inputs):
            n = _length(piece, probe)
            if n is None:
                return None
            if offset < n:
                return trace_element(piece, offset, probe, path + (i,))
            offset -= n
        return None
    if op == "Shape":
        src = node.inputs[0]
        rank = probe[src.name].ndim if src.name in probe else None
        if rank is None:
            return None
        start = attr(node, "start", 0)
        start = start + rank if start < 0 else start
        return DimElement(src.name, start + index)
    if op == "Gather":
        if attr(node, "axis", 0) != 0:
            return None
        idx = const_array(node.inputs[1])
        n = _length(node.inputs[0], probe)
        if idx is None or n is None:
            return None
        flat = np.asarray(idx).reshape(-1)
        if index >= flat.size:
            return None
        src_index = int(flat[index]) % n
        return trace_element(node.inputs[0], src_index, probe, path + (0,))
    if op == "Mul":
        # A dimension times a constant integer: repeat_kv's head count ``kv_heads * n_rep``.
        for i, other in ((0, 1), (1, 0)):
            c = const_array(node.inputs[other])
            if c is not None and np.size(c) == 1 and np.issubdtype(np.asarray(c).dtype, np.integer):
                elem = trace_element(node.inputs[i], index, probe, path + (i,))
                if isinstance(elem, DimElement) and elem.divisor is None:
                    n = int(np.reshape(c, -1)[0])
                    factor = ConstElement(path + (other,), 0, n) if elem.scale == 1 else None
                    return DimElement(elem.value, elem.axis, elem.scale * n, factor)
        return None
    if op == "Div":
        # A dimension divided by a constant integer: the batch of a folded (batch x heads) axis.
        c = const_array(node.inputs[1])
        if c is None or np.size(c) != 1 or not np.issubdtype(np.asarray(c).dtype, np.integer):
            return None
        elem = trace_element(node.inputs[0], index, probe, path + (0,))
        if isinstance(elem, DimElement) and elem.scale == 1 and elem.divisor is None:
            return DimElement(elem.value, elem.axis,
                              divisor=ConstElement(path + (1,), 0, int(np.reshape(c, -1)[0])))
        return None
    if op == "ConstantOfShape":  # every element is the fill value (0.0 unless given)
        fill = node.attributes.get("value")
        value = np.reshape(fill.value.numpy(), -1)[0] if fill is not None else 0
        return ConstElement(path, 0, int(value), editable=False) if value == int(value) else None
    if op == "Where":
        # torch's expand(-1) handling: Where(Equal(t, -1), ones, t). A dimension is never -1, so
        # where ``t`` is a dimension the condition is false and the element is ``t``'s.
        cond = node.inputs[0].producer()
        if cond is None or cond.op_type != "Equal":
            return None
        others = [v for v in cond.inputs if v.name != node.inputs[2].name]
        if len(others) != 1 or not _static(others[0]):
            return None  # not Equal(t, a constant): nothing proves the condition false
        minus = const_array(others[0])
        minus = probe.get(others[0].name) if minus is None else minus
        elem = trace_element(node.inputs[2], index, probe, path + (2,))
        if isinstance(elem, DimElement) and minus is not None and np.size(minus) and \
                np.reshape(minus, -1)[index % np.size(minus)] == -1:
            return elem
        return None
    if op == "Reshape":  # of a 1-D shape tensor into [-1]: the same elements
        target = const_array(node.inputs[1])
        if target is not None and np.reshape(target, -1).tolist() == [-1]:
            return trace_element(node.inputs[0], index, probe, path + (0,))
        return None
    if op == "Slice":
        n = _length(node.inputs[0], probe)
        parts = [const_array(v) if v is not None else None for v in node.inputs[1:]]
        if n is None or any(p is None for p in parts[:2]):
            return None
        starts, ends = int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0])
        if len(parts) > 2 and parts[2] is not None and int(parts[2].reshape(-1)[0]) != 0:
            return None
        step = int(parts[3].reshape(-1)[0]) if len(parts) > 3 and parts[3] is not None else 1
        picked = np.arange(n)[slice(starts, ends, step)]
        if index >= picked.size:
            return None
        return trace_element(node.inputs[0], int(picked[index]), probe, path + (0,))
    return None


def _static(value: ir.Value, depth: int = 0) -> bool:
    """True when ``value`` is computed from constants alone (its probe value holds for any input)."""
    if const_array(value) is not None:
        return True
    node = value.producer()
    if node is None or depth > 16:
        return False
    if node.op_type == "ConstantOfShape":  # every element is the fill value, whatever the shape
        return True
    return all(v is None or _static(v, depth + 1) for v in node.inputs)


def shape_axes(node: ir.Node, rank: int) -> np.ndarray:
    """The input axes a ``Shape`` node's output lists (its ``start`` and ``end`` range)."""
    start = attr(node, "start", 0)
    start = start + rank if start < 0 else start
    return np.arange(rank)[slice(start, attr(node, "end", None))]


def shape_reads(node: ir.Node, rank: int) -> list[tuple[ir.Node, np.ndarray | None]]:
    """Each reader of a ``Shape`` node's output with the input axes it picks: a Gather or a
    Slice by constants; None where the reader could use any of them."""
    dims = shape_axes(node, rank)
    out = []
    for use in node.outputs[0].uses():
        user, picked = use.node, None
        args = [const_array(v) for v in user.inputs[1:]]
        if user.op_type == "Gather" and use.idx == 0 and args[0] is not None:
            picked = dims[np.reshape(args[0], -1)]
        elif user.op_type == "Slice" and use.idx == 0 and all(a is not None for a in args[:2]) \
                and (len(args) < 3 or args[2] is None or int(np.reshape(args[2], -1)[0]) == 0):
            step = int(np.reshape(args[3], -1)[0]) if len(args) > 3 and args[3] is not None else 1
            picked = dims[int(np.reshape(args[0], -1)[0]):int(np.reshape(args[1], -1)[0]):step]
        out.append((user, picked))
    return out
