"""Stage *rewrite*: physically slice the kept units out of the graph.

Every edit is made per *use*: a weight, bias or shape constant gets a private, sliced copy for the
node input that needs it, and shared shape-building nodes on the way to a shape constant are cloned
first. So pruning one layer can never change another, however much the exporter de-duplicated.
Emptied blocks are removed (their residual add keeps only the bias), then dead nodes and unused
initializers are dropped. Dynamic axes are untouched: only channel widths change.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optin_onnx.analysis import Block, PortChange, Structure
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, const_root, copy_model, nodes_by_name


class _Namer:
    def __init__(self, graph: ir.Graph):
        self.used = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
        self.used |= set(graph.initializers) | {v.name for v in graph.inputs}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    # np.array, not np.ascontiguousarray: that one makes a scalar (a Div's unit count) 1-D.
    value = ir.Value(name=name, const_value=ir.tensor(np.array(array, order="C"), name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def _gather(graph: ir.Graph, node: ir.Node, index: int, axis: int, keep: np.ndarray,
            namer: _Namer) -> None:
    """Feed ``node.inputs[index]`` through a Gather of the ``keep`` positions on ``axis``: a
    run-time value (shared with other uses, e.g. every layer's position bias) sliced for this
    use alone."""
    base = node.inputs[index].name or f"{node.name}_in"
    name = namer(f"{base}__kept")
    indices = ir.Value(name=f"{name}_idx", const_value=ir.tensor(keep.astype(np.int64),
                                                                   name=f"{name}_idx"))
    graph.register_initializer(indices)
    gather = ir.Node("", "Gather", [node.inputs[index], indices], name=name,
                     attributes=[ir.AttrInt64("axis", axis)])
    gather.outputs[0].name = name
    graph.insert_before(node, gather)
    node.replace_input_with(index, gather.outputs[0])


def _clone_producer(graph: ir.Graph, node: ir.Node, index: int, namer: _Namer) -> ir.Node | None:
    """Give ``node.inputs[index]`` a private producer (clone the producer if the value is shared)."""
    value = node.inputs[index]
    producer = value.producer()
    if producer is None:
        return None
    if len(value.uses()) == 1 and not value.is_graph_output():
        return producer
    clone = ir.Node(producer.domain, producer.op_type, list(producer.inputs),
                    attributes=list(producer.attributes.values()), num_outputs=len(producer.outputs),
                    name=namer(f"{producer.name}__private"))
    for out, orig in zip(clone.outputs, producer.outputs):
        out.name = namer(f"{orig.name}__private")
    graph.insert_before(node, clone)
    node.replace_input_with(index, clone.outputs[value.index()])
    return clone


def _slice_blocks(graph: ir.Graph, blocks: list[tuple[Block, list[int]]], namer: _Namer) -> None:
    """Delete the dropped channels of every block. Edits are collected per tensor use and axis
    first: after a channel Concat several blocks own parts of one axis, and their deletions must
    be made together (positions are those of the dense tensor)."""
    nodes = nodes_by_name(graph)
    cuts: dict[tuple[str, int, int], list[np.ndarray]] = {}
    runtime: dict[tuple[str, int, int], int] = {}  # gathered run-time uses -> dense axis size
    for block, units in blocks:
        dropped = sorted(set(range(block.n_units)) - set(units))
        for s in block.slices:
            positions = block.indices(dropped, s.role, s.repeat, s.offset, s.group)
            cuts.setdefault((s.node, s.input_index, s.axis), []).append(positions)
            if s.runtime:
                runtime[(s.node, s.input_index, s.axis)] = block.width(s.role, s.repeat, s.group)
    # One sliced copy per stored tensor and cut: a weight applied in several layers (ALBERT),
    # cut alike in each, stays one shared tensor.
    made: dict[tuple[int, int, bytes], ir.Value] = {}
    for (node_name, index, axis), positions in cuts.items():
        node = nodes[node_name]
        if (node_name, index, axis) in runtime:
            keep = np.setdiff1d(np.arange(runtime[(node_name, index, axis)]),
                                np.concatenate(positions))
            _gather(graph, node, index, axis, keep, namer)
            continue
        arr = const_array(node.inputs[index])
        if arr is None:
            raise OptinError(f"internal: {node_name} input {index} is no longer a constant")
        dropped = np.unique(np.concatenate(positions))
        key = (id(const_root(node.inputs[index])), axis, dropped.tobytes())
        if key in made:
            node.replace_input_with(index, made[key])
            continue
        sliced = np.delete(arr, dropped, axis=axis)
        base = node.inputs[index].name or f"{node_name}_w"
        _set_const(graph, node, index, sliced, namer(f"{base}__sliced"))
        made[key] = node.inputs[index]
    for block, units in blocks:
        dropped = sorted(set(range(block.n_units)) - set(units))
        for e in block.shape_edits:  # a width shrinks by what this block drops from it
            node = nodes[e.node]
            for slot in e.path[:-1]:
                node = _clone_producer(graph, node, slot, namer)
            slot = e.path[-1]
            arr = np.array(const_array(node.inputs[slot]), copy=True)
            arr.reshape(-1)[e.offset] -= len(block.indices(dropped, e.role, e.repeat,
                                                            group=e.group))
            base = node.inputs[slot].name or f"{node.name}_shape"
            _set_const(graph, node, slot, arr, namer(f"{base}__{block.name}"))
        for e in block.attr_edits:  # num_heads of a fused attention, a depthwise conv's group
            node, n = nodes[e.node], len(block.indices(dropped, e.role, group=e.group))
            value = node.attributes[e.name].value
            if e.index < 0:
                node.attributes[e.name] = ir.AttrInt64(e.name, value - n)
            else:
                value = list(value)
                value[e.index] -= n
                node.attributes[e.name] = ir.AttrInt64s(e.name, value)


def _remove_block(graph: ir.Graph, block: Block, namer: _Namer) -> None:
    """Replace the block's contribution to its residual add by its bias (or by nothing)."""
    r = block.removal
    nodes = nodes_by_name(graph)
    add = nodes[r.node]
    bias = r.constant(lambda node_name, slot: const_array(nodes[node_name].inputs[slot]))
    if bias is None:
        if add.outputs[0].is_graph_output():
            raise OptinError(f"cannot remove {block.name}: its residual add is a graph output")
        ir.convenience.replace_all_uses_with(add.outputs[0], add.inputs[1 - r.input_index])
    else:
        _set_const(graph, add, r.input_index, bias, namer(f"{block.name}__bias"))


def rewrite(model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]]) -> ir.Model:
    """Return a sliced copy of ``model`` keeping, for each block name, the listed unit indices.

    Blocks not in ``keep`` are left whole. A block with no kept units is removed, which requires
    ``block.removal`` (the analysis proved where its output goes); otherwise it is an error.
    """
    unknown = sorted(set(keep) - {b.name for b in structure.blocks})
    if unknown:
        raise OptinError(f"no block named {unknown[0]!r} (blocks: "
                         f"{', '.join(b.name for b in structure.blocks)})")
    out = copy_model(model)
    graph = out.graph
    namer = _Namer(graph)
    sliced = []
    for block in structure.blocks:
        if block.name not in keep:
            continue
        units = sorted(int(u) for u in keep[block.name])
        if any(u < 0 or u >= block.n_units for u in units) or len(set(units)) != len(units):
            raise OptinError(f"invalid units for {block.name}: {units}")
        if len(units) == block.n_units:
            continue
        if not units:
            if block.removal is None:
                raise OptinError(f"cannot remove all units of {block.name}: its output does not "
                                 f"provably reach a residual add")
            _remove_block(graph, block, namer)
        else:
            sliced.append((block, units))
    _slice_blocks(graph, sliced, namer)
    _resize_ports(graph, structure.interface({b.name: u for b, u in sliced}))
    RemoveUnusedNodesPass()(out)
    # Recorded intermediate shapes (the dynamo exporter writes them) are stale now; graph inputs
    # and outputs keep theirs: pruning changes them only at cache ports, resized above.
    for node in graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    return out


def _resize_ports(graph: ir.Graph, changes: Mapping[str, PortChange]) -> None:
    """Declare the kept size on each graph input and output that carries a pruned axis (a KV
    cache's head axis); a symbolic dimension stays symbolic."""
    for v in (*graph.inputs, *graph.outputs):
        change = changes.get(v.name)
        if change is None or v.shape is None or not isinstance(v.shape[change.axis], int):
            continue
        dims = list(v.shape)
        dims[change.axis] = len(change.kept)
        v.shape = ir.Shape(dims)
