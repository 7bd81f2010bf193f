"""KV caches on a model's interface: which graph inputs a past state comes from, and whether
anything but the attention reads its heads axis. A cache whose past and present carry a block's
heads axis shrinks with the heads kept (:class:`~optin_onnx.analysis.structure.Port`); these
checks decide where that is exact."""
from __future__ import annotations

import onnx_ir as ir

from optin_onnx.analysis.shapes import shape_axes, shape_reads
from optin_onnx.graph import attr, const_array

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


#: Fused attention ops that read a past state ``[batch, heads, past, head size]``: its input
#: slots (key, value).
FUSED_PAST = {("com.microsoft", "GroupQueryAttention"): (3, 4),
              ("com.microsoft", "MultiHeadAttention"): (6, 7), ("", "Attention"): (4, 5)}


def reaches_output(value: ir.Value) -> bool:
    """Whether ``value`` is a graph output, or becomes one through copies only."""
    return value.is_graph_output() or any(is_copy(use.node) and reaches_output(use.node.outputs[0])
                                          for use in value.uses())


def cache_inputs(model: ir.Model) -> dict[str, int]:
    """A decoder's key/value cache inputs: input name -> the axis that is the past length.

    Found by structure, not by name (exporters write ``past.0.key``, ``past_key_values.0.key``,
    ``past_key.0`` ...): a float graph input of known rank that reaches, through copies only, an
    operand of a ``Concat`` of two or more operands whose output reaches a graph output (the
    ``present`` cache) the same way, the concat axis being the past axis; or the past input of a
    fused attention op (:data:`FUSED_PAST`, axis 2). An encoder or CNN has no such input, and an
    input that merely feeds a ``Concat`` inside the graph is not one.
    """
    found: dict[str, int] = {}
    for value in model.graph.inputs:
        if (value.is_initializer() or value.dtype is None or not value.dtype.is_floating_point()
                or value.shape is None):
            continue
        rank = len(value.shape)
        frontier = [value]
        while frontier and value.name not in found:
            current = frontier.pop()
            for use in current.uses():
                node = use.node
                domain = "" if node.domain == "ai.onnx" else node.domain
                if is_copy(node):
                    frontier.append(node.outputs[0])
                elif node.op_type == "Concat" and reaches_output(node.outputs[0]):
                    axis = attr(node, "axis", 0)
                    if -rank <= axis < rank:
                        found[value.name] = axis % rank
                        break
                elif use.idx in FUSED_PAST.get((domain, node.op_type), ()) and rank == 4:
                    found[value.name] = 2
                    break
    return found
