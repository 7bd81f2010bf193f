"""Stage *instrument*: the masked dense graph.

A block's mask multiplies the data input of each of its consumers (the MatMul/Gemm that contracts
the block's channels against a weight). Because a block's channels reach the rest of the network
only through its consumers, zeroing them there is exactly equivalent to slicing the block out,
which is the invariant the verify stage checks (masked == sliced).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Role, Structure
from optin_onnx.graph import copy_model, nodes_by_name


def channel_mask(block: Block, unit_mask: np.ndarray, role: Role, group: int = 1) -> np.ndarray:
    """Expand a per-unit 0/1 mask to the consumer's channels (FLAT: ``unit_size`` each, times the
    ``group`` sub-units of a unit: the query heads of one key/value head)."""
    unit_mask = np.asarray(unit_mask, dtype=np.float32)
    return np.repeat(unit_mask, (block.unit_size if role is Role.FLAT else 1) * group)


def unit_masks(structure: Structure, keep: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Per-block 0/1 unit masks of a selection (blocks ``keep`` does not name stay whole): the
    ``masks`` argument of :func:`masked_model`."""
    out = {}
    for b in structure.blocks:
        m = np.zeros(b.n_units, dtype=np.float32)
        m[list(keep.get(b.name, range(b.n_units)))] = 1.0
        out[b.name] = m
    return out


def oriented(weight: np.ndarray, consumer: Consumer) -> np.ndarray:
    """A consumer's weight with its contracted (channel) axis second to last, i.e. [K, N] for a
    MatMul or a Gemm without transB. Swapping is its own inverse, so this also maps back."""
    if consumer.weight_axis == weight.ndim - 2:
        return weight
    return np.swapaxes(weight, -1, -2)


def mask_input_name(block: Block) -> str:
    return f"optin_mask__{block.name}"


def masked_model(model: ir.Model, structure: Structure,
                 masks: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """A copy of ``model`` with a mask Mul at every consumer input of every block.

    With ``masks`` (block name -> per-unit 0/1 array) the masks are constants (blocks not named stay
    dense); without, each block gets a float graph input ``optin_mask__<block>`` of its channel
    width, so one session can evaluate any mask. A consumer input shared by several blocks (after
    a channel Concat) gets one Mul by their masks joined at their offsets.
    """
    out = copy_model(model)
    graph = out.graph
    nodes = nodes_by_name(graph)
    inputs: dict[str, ir.Value] = {}
    uses: dict[tuple[str, int], list[tuple[Block, Consumer, int]]] = {}
    for block in structure.blocks:
        if masks is not None and block.name not in masks:
            continue
        if masks is None:
            inputs[block.name] = ir.Value(
                name=mask_input_name(block), type=ir.TensorType(ir.DataType.FLOAT),
                shape=ir.Shape([block.width(block.consumers[0].role,
                                            group=block.consumers[0].group)]))
            graph.inputs.append(inputs[block.name])
        for i, c in enumerate(block.consumers):
            uses.setdefault((c.node, c.data_index), []).append((block, c, i))
    for (node_name, index), parts in uses.items():
        node = nodes[node_name]
        parts.sort(key=lambda part: part[1].offset)
        block, c, i = parts[0]
        segments = _segments([(b, k) for b, k, _ in parts])
        if masks is None:
            mask = _joined(graph, node, [(b, inputs[b.name] if b else None, width)
                                         for b, width in segments])
            if c.repeat > 1:
                mask = _repeated(graph, node, mask, c.repeat)
            if c.trailing:
                mask = _channel_first(graph, node, mask, c.trailing)
        else:
            arr = np.concatenate([np.ones(width, np.float32) if b is None else
                                  channel_mask(b, masks[b.name], c.role, c.group)
                                  for b, width in segments])
            arr = np.repeat(arr, c.repeat).reshape((-1,) + (1,) * c.trailing)
            mask = ir.Value(name=f"{mask_input_name(block)}_{i}", const_value=ir.tensor(arr))
            graph.register_initializer(mask)
        data = node.inputs[index]
        mul = ir.Node("", "Mul", [data, mask], name=f"{node.name}__optin_mask")
        mul.outputs[0].name = f"{data.name}__masked_{i}_{block.name}"
        graph.insert_before(node, mul)
        node.replace_input_with(index, mul.outputs[0])
    return out


def _segments(parts: list[tuple[Block, Consumer]]) -> list[tuple[Block | None, int]]:
    """The channel axis of one consumer input as (block, width) runs in order: one block, or
    after a channel Concat several at their offsets, with None for channels of no block."""
    out: list[tuple[Block | None, int]] = []
    at = 0
    for b, k in parts:
        if k.offset > at:
            out.append((None, k.offset - at))
        out.append((b, b.width(k.role, group=k.group)))
        at = k.offset + b.width(k.role, group=k.group)
    if parts[0][1].span > at:
        out.append((None, parts[0][1].span - at))
    return out


def _joined(graph: ir.Graph, before: ir.Node,
            segments: list[tuple[Block | None, ir.Value | None, int]]) -> ir.Value:
    """One mask for a consumer input: a block's mask input as it is, or the runs' masks
    concatenated (ones where no block owns the channels)."""
    if len(segments) == 1 and segments[0][0] is not None:
        return segments[0][1]
    pieces, at = [], 0
    for b, value, width in segments:
        pieces.append(value if b is not None else
                      _ones(graph, f"{before.name}__optin_ones{at}", width))
        at += width
    node = ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", 0)],
                   name=f"{before.name}__optin_mask_concat")
    graph.insert_before(before, node)
    return node.outputs[0]


def _ones(graph: ir.Graph, name: str, n: int) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ones(n, np.float32)))
    graph.register_initializer(value)
    return value


def _repeated(graph: ir.Graph, before: ir.Node, mask: ir.Value, repeat: int) -> ir.Value:
    """``mask`` with every channel repeated ``repeat`` times (for a flattened feature map)."""
    tag = f"{mask.name}__x{repeat}_{before.name}"
    flat = ir.Value(name=f"{tag}_flat", const_value=ir.tensor(np.array([-1], np.int64)))
    column = ir.Value(name=f"{tag}_col", const_value=ir.tensor(np.array([-1, 1], np.int64)))
    for v in (flat, column):
        graph.register_initializer(v)
    ones = ir.Value(name=f"{tag}_ones", const_value=ir.tensor(np.ones((1, repeat), np.float32)))
    graph.register_initializer(ones)
    col = ir.Node("", "Reshape", [mask, column], name=f"{tag}_reshape_col")
    tiled = ir.Node("", "Mul", [col.outputs[0], ones], name=f"{tag}_tile")
    out = ir.Node("", "Reshape", [tiled.outputs[0], flat], name=f"{tag}_reshape")
    for n in (col, tiled, out):
        graph.insert_before(before, n)
    return out.outputs[0]


def _channel_first(graph: ir.Graph, before: ir.Node, mask: ir.Value, trailing: int) -> ir.Value:
    """``mask`` as [C, 1, ..., 1], to broadcast on an axis followed by ``trailing`` others."""
    tag = f"{mask.name}__c{trailing}_{before.name}"
    shape = ir.Value(name=f"{tag}_shape",
                     const_value=ir.tensor(np.array([-1] + [1] * trailing, np.int64)))
    graph.register_initializer(shape)
    node = ir.Node("", "Reshape", [mask, shape], name=f"{tag}_reshape")
    graph.insert_before(before, node)
    return node.outputs[0]
