"""KV caches on a model's interface: which graph inputs a past state comes from, and whether
anything but the attention reads its heads axis. A cache whose past and present carry a block's
heads axis shrinks with the heads kept (:class:`~optin_onnx.analysis.structure.Port`); these
checks decide where that is exact."""
from __future__ import annotations

import onnx_ir as ir

from optin_onnx.analysis.shapes import shape_axes, shape_reads
from optin_onnx.graph import const_array

#: Ops that pass a value on unchanged, as far as a cache's axes go.
_COPIES = {"Identity", "Cast"}


def is_copy(node: ir.Node | None) -> bool:
    """Identity, Cast, or a Concat of one input (TorchScript writes one around a past state)."""
    return node is not None and (node.op_type in _COPIES or (
        node.op_type == "Concat" and len([v for v in node.inputs if v is not None]) == 1))


def through_copies(v: ir.Value) -> ir.Node | None:
    """The first producer of ``v`` that is not a copy."""
    node = v.producer()
    while is_copy(node):
        node = node.inputs[0].producer()
    return node


def source_input(v: ir.Value) -> ir.Value | None:
    """The graph input that ``v`` copies, or None."""
    while is_copy(v.producer()):
        v = v.producer().inputs[0]
    return v if v.producer() is None and const_array(v) is None and v.is_graph_input() else None


def reads_axis(source: ir.Value, axis: int, rank: int, reader: ir.Node) -> bool:
    """Whether graph input ``source`` is read on ``axis`` anywhere but through copies into
    ``reader``: only a ``Shape`` whose readers pick other axes (the past length, the batch) reads
    it harmlessly."""
    stack = [source]
    while stack:
        v = stack.pop()
        for use in v.uses():
            node = use.node
            if node is reader:
                continue
            if is_copy(node):
                stack.append(node.outputs[0])
            elif node.op_type == "Shape":
                if axis in shape_axes(node, rank) and any(
                        picked is None or axis in picked for _, picked in shape_reads(node, rank)):
                    return True
            else:
                return True
        if v.is_graph_output():
            return True
    return False


def written_out(v: ir.Value) -> bool:
    """Whether ``v`` (a fused attention's present state) is a graph output read by nothing in
    the graph, directly or through copies."""
    stack, found = [v], False
    while stack:
        u = stack.pop()
        found |= u.is_graph_output()
        for use in u.uses():
            if not is_copy(use.node):
                return False
            stack.append(use.node.outputs[0])
    return found
