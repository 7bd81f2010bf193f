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

from optin_onnx.analysis import Block, Role, Structure
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, copy_model, nodes_by_name


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
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)


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


def _kept_indices(block: Block, role: Role, units: Sequence[int]) -> np.ndarray:
    return np.asarray(block.channels(units) if role is Role.FLAT else list(units), dtype=np.int64)


def _new_size(block: Block, role: Role, n_kept: int) -> int:
    return n_kept * block.unit_size if role is Role.FLAT else n_kept


def _slice_block(graph: ir.Graph, block: Block, units: Sequence[int], namer: _Namer) -> None:
    nodes = nodes_by_name(graph)
    for s in block.slices:
        node = nodes[s.node]
        arr = const_array(node.inputs[s.input_index])
        if arr is None:
            raise OptinError(f"internal: {s.node} input {s.input_index} is no longer a constant")
        sliced = np.take(arr, _kept_indices(block, s.role, units), axis=s.axis)
        base = node.inputs[s.input_index].name or f"{s.node}_w"
        _set_const(graph, node, s.input_index, sliced, namer(f"{base}__{block.name}"))
    for e in block.shape_edits:
        node = nodes[e.node]
        for slot in e.path[:-1]:
            node = _clone_producer(graph, node, slot, namer)
        slot = e.path[-1]
        arr = np.array(const_array(node.inputs[slot]), copy=True)
        arr.reshape(-1)[e.offset] = _new_size(block, e.role, len(units))
        base = node.inputs[slot].name or f"{node.name}_shape"
        _set_const(graph, node, slot, arr, namer(f"{base}__{block.name}"))


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
            _slice_block(graph, block, units, namer)
    RemoveUnusedNodesPass()(out)
    # Recorded intermediate shapes (the dynamo exporter writes them) are stale now; graph inputs
    # and outputs keep theirs, since pruning never changes them.
    for node in graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    return out
