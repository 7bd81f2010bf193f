"""Where does one element of a run-time shape tensor come from?

Exporters build Reshape targets in three ways, and head pruning must handle all of them:

    constant          Reshape(x, [0, 0, 12, 64])
    Concat of pieces  Reshape(x, Concat(Unsqueeze(Gather(Shape(h), 0)), ..., [12], [64]))
    inferred          Reshape(x, [b, s, -1, 64])

:func:`trace_element` follows one element back through the small integer ops that build shapes
(Concat, Gather, Slice, Unsqueeze, Squeeze, Cast, Identity, Shape) and answers either "a constant,
at offset k of the tensor feeding this node input" (rewritable per use), or "dimension a of tensor t"
(it follows t), or unknown (anything else: the caller must treat it as a barrier).
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


@dataclass(frozen=True)
class DimElement:
    value: str  # the tensor whose dimension this is
    axis: int


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
