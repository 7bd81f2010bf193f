"""Stage *analyse*: find the prunable blocks of a graph (see :mod:`optin_onnx.analysis.propagate`)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.groups import Group
from optin_onnx.analysis.propagate import propagate
from optin_onnx.analysis.structure import (AttrEdit, Block, Consumer, Declined, ParamSlice, Port,
                                           PortChange, Removal, Role, ShapeEdit, Structure,
                                           pruned_feeds)
from optin_onnx.graph import const_array, nodes_by_name, subgraphs

__all__ = ["analyze_graph", "AttrEdit", "pre_layer_norm", "residual_features", "Block", "Consumer",
           "Declined", "ParamSlice", "Port", "PortChange", "Removal", "Role", "ShapeEdit",
           "Structure", "pruned_feeds"]

#: Ops a removed block's contribution may pass through on its way to the residual add.
_PASS_THROUGH = {"Reshape", "Identity", "Dropout"}


def _feature(node: ir.Node) -> str:
    """The consumer's output plus its bias, if a bias Add follows (the FFN output of BERT)."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        other = uses[0].node.inputs[1 - uses[0].idx]
        if const_array(other) is not None:
            return uses[0].node.outputs[0].name
    return out.name


def _removal(node: ir.Node, probe: dict[str, np.ndarray]) -> Removal | None:
    """Follow a consumer's output to the residual Add it feeds, collecting biases (constant Adds)
    and scales (Mul by a constant, or Div of it by one: a layer scale) on the way."""
    bias: list[tuple[str, int]] = []
    scales: list[tuple[str, int, int, bool]] = []
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias.append((node.name, 2))
    v = node.outputs[0]
    for _ in range(8):
        uses = v.uses()
        if len(uses) != 1 or v.is_graph_output():
            return None
        user, idx = uses[0].node, uses[0].idx
        if user.op_type in _PASS_THROUGH and idx == 0:
            v = user.outputs[0]
            continue
        if user.op_type in ("Mul", "Div") and len(user.inputs) == 2 and \
                (user.op_type == "Mul" or idx == 0):
            other = user.inputs[1 - idx]
            if const_array(other) is None or probe.get(v.name) is None or \
                    probe.get(user.outputs[0].name) is None or \
                    probe[v.name].shape != probe[user.outputs[0].name].shape:
                return None
            scales.append((user.name, 1 - idx, len(bias), user.op_type == "Div"))
            v = user.outputs[0]
            continue
        if user.op_type != "Add":
            return None
        other = user.inputs[1 - idx]
        if const_array(other) is not None:
            bias.append((user.name, 1 - idx))
            v = user.outputs[0]
            continue
        # The residual add: the other operand must already have the full output shape.
        if probe.get(other.name) is None or probe.get(user.outputs[0].name) is None or \
                probe[other.name].shape != probe[user.outputs[0].name].shape:
            return None
        return Removal(user.name, idx, tuple(bias), tuple(scales))
    return None


class _Width(Declined):
    """A group that ends at the model width (see ``Structure.model_width``)."""


def _to_block(g: Group, nodes: dict[str, ir.Node], probe) -> Block | Declined | None:
    """A group becomes a block when it ends in weight contractions with nothing in the way. A group
    that never got there is declined if an unknown op stopped it and nothing marks it as the model
    width; one that ended at the model width (the residual stream's projections end at a residual
    add or a LayerNorm by design) is listed as such. Only a group stopped by nothing (its values
    unused) is dropped."""
    name = f"group@{g.sources[0]}"
    reasons = list(dict.fromkeys(g.barriers))
    if not g.consumers or (reasons and g.natural and not g.hard and not g.has_head):
        # Without consumers, or stopped only where the model width ends (an embedding projection
        # read by the first layer and by its residual add): the model width, never a block.
        if g.hard and not g.natural:
            return Declined(name, reasons)
        return _Width(name, reasons) if g.natural else None
    unit = g.unit_size or 1
    if not reasons and g.width % (unit * g.grouping):
        reasons.append(f"width {g.width} is not a multiple of unit size {unit * g.grouping}")
    if reasons:
        return Declined(name, reasons)
    n_units = g.width // (unit * g.grouping)
    if n_units < 2:
        return None
    consumer = nodes[g.consumers[0].node]
    kind = "attention" if g.has_head else "mlp"
    if any(nodes[s].op_type == "Conv" for s in g.sources):
        kind = "channels"  # conv channel groups are never emptied: no removal
    # A block with cache ports is never emptied: its present outputs would keep no head.
    removal = _removal(consumer, probe) if len(g.consumers) == 1 and kind != "channels" \
        and not g.ports else None
    return Block(
        name=name, kind=kind, n_units=n_units, unit_size=unit,
        sources=list(dict.fromkeys(g.sources)), consumers=list(dict.fromkeys(g.consumers)),
        slices=list(dict.fromkeys(g.slices)), shape_edits=list(dict.fromkeys(g.shape_edits)),
        nodes=list(dict.fromkeys(g.nodes)), feature=_feature(consumer),
        removal=removal,
        attr_edits=list(dict.fromkeys(g.attr_edits)), ports=list(dict.fromkeys(g.ports)))


def _control_flow(model: ir.Model) -> list[Declined]:
    """Control-flow nodes whose branches hold matrix products: not analysed (their layers are
    never pruned) and, since onnxruntime does not expose a branch's values, not counted in the
    MACs either; said here rather than left out silently."""
    out = []
    for node in model.graph:
        inner = [n for g in subgraphs(node) for n in g.all_nodes()
                 if n.op_type in ("MatMul", "Gemm", "Conv")]
        if inner:
            out.append(Declined(f"control flow@{node.name}", [
                f"{node.op_type} '{node.name}' holds {len(inner)} matrix product(s) in its "
                f"branches: control flow is not analysed, and their MACs are not counted"]))
    return out


def analyze_graph(model: ir.Model, probe: dict[str, np.ndarray]) -> Structure:
    """Find every prunable block of ``model`` (names must be unique: see ``graph.normalize``).

    Blocks are ordered by where their consumer sits in the graph. Layers: a layer is an attention
    block followed by an MLP block (BERT, ViT); a block that cannot join the current layer (a
    second attention block, or anything after its MLP) opens the next one, so names stay unique
    even where a declined block leaves a layer half-empty. A conv channel group is a layer of its
    own.
    """
    nodes = nodes_by_name(model.graph)
    order = {n.name: i for i, n in enumerate(model.graph)}
    structure = Structure()
    structure.declined.extend(_control_flow(model))
    groups = {}
    found, factors = propagate(model, probe)
    for g in found:
        item = _to_block(g, nodes, probe)
        if isinstance(item, Block):
            structure.blocks.append(item)
            groups[id(item)] = g
        elif isinstance(item, _Width):
            structure.model_width.append(Declined(item.name, item.reasons))
        elif isinstance(item, Declined):
            structure.declined.append(item)
    structure.blocks.sort(key=lambda b: min(order[c.node] for c in b.consumers))
    layer, filled = -1, {"attention", "mlp"}
    for b in structure.blocks:
        if b.kind == "channels" or "channels" in filled or b.kind in filled or \
                (b.kind == "attention" and "mlp" in filled):
            layer, filled = layer + 1, set()
        filled.add(b.kind)
        b.layer = layer
    structure.n_layers = layer + 1
    for b in structure.blocks:
        b.name = f"layer{b.layer}.{b.kind}"
    name_of = {groups[id(b)].id: b.name for b in structure.blocks}
    for node, axes in factors.items():
        for parts in axes:
            names = tuple(name_of[g] for g, _ in parts if g in name_of)
            if names:
                fixed = sum(w for g, w in parts if g not in name_of)
                structure.mac_factors.setdefault(node, []).append((names, fixed))
    return structure


def _attention_input(block: Block, nodes: dict[str, ir.Node]) -> ir.Value:
    """The value an attention block's Q/K/V projections read (its first source's data input)."""
    return nodes[block.sources[0]].inputs[0]


def _normalised(v: ir.Value) -> ir.Node | None:
    """The LayerNormalization that produced ``v``, through reshapes (onnxsim's ``Reshape -> Gemm``)."""
    node = v.producer()
    while node is not None and node.op_type in _PASS_THROUGH:
        node = node.inputs[0].producer()
    return node if node is not None and node.op_type == "LayerNormalization" else None


def pre_layer_norm(model: ir.Model, structure: Structure) -> bool:
    """True when every attention block reads a LayerNormalization of the residual stream (pre-LN:
    ViT, DeiT, Dinov2): the normalised value is the stream the block's residual Add also reads.
    In a post-LN model (BERT) the residual Add reads the normalised value itself."""
    nodes = nodes_by_name(model.graph)
    attention = [b for b in structure.blocks if b.kind == "attention"]
    if not attention:
        return False
    for b in attention:
        ln = _normalised(_attention_input(b, nodes))
        if ln is None:
            return False
        stream = ln.inputs[0]
        adds = [u.node for u in stream.uses() if u.node.op_type == "Add"]
        if b.removal is not None:
            adds = [a for a in adds if a.name == b.removal.node]
        if not adds:
            return False
    return True


def residual_features(model: ir.Model, structure: Structure) -> dict[int, str]:
    """Layer l -> the LayerNorm'ed residual stream leaving layer l: the input of layer l+1's
    attention projections, and for the last layer the graph's final normalisation (the last
    LayerNormalization after every block; without one, the last residual add or the output)."""
    nodes = nodes_by_name(model.graph)
    order = {n.name: i for i, n in enumerate(model.graph)}
    entering = {b.layer: _attention_input(b, nodes).name
                for b in structure.blocks if b.kind == "attention"}
    out = {z - 1: name for z, name in entering.items() if z >= 1}
    last = structure.n_layers - 1
    end = max((order[c.node] for b in structure.blocks for c in b.consumers), default=-1)
    final = [n for n in model.graph if n.op_type == "LayerNormalization" and order[n.name] > end]
    if final:
        out[last] = final[-1].outputs[0].name
    else:
        last_blocks = [b for b in structure.blocks if b.layer == last and b.removal is not None]
        out[last] = (nodes[last_blocks[-1].removal.node].outputs[0].name if last_blocks
                     else model.graph.outputs[0].name)
    return out
