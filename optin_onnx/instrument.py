"""Stage *instrument*: the masked dense graph.

A block's mask multiplies the data input of each of its consumers (the MatMul/Gemm that contracts
the block's channels against a weight). Because a block's channels reach the rest of the network
only through its consumers, zeroing them there is exactly equivalent to slicing the block out,
which is the invariant the verify stage checks (masked == sliced).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Role, Structure
from optin_onnx.graph import copy_model, nodes_by_name


def channel_mask(block: Block, unit_mask: np.ndarray, role: Role) -> np.ndarray:
    """Expand a per-unit 0/1 mask to the consumer's channels (FLAT: ``unit_size`` each)."""
    unit_mask = np.asarray(unit_mask, dtype=np.float32)
    return np.repeat(unit_mask, block.unit_size) if role is Role.FLAT else unit_mask


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
    width, so one session can evaluate any mask.
    """
    out = copy_model(model)
    graph = out.graph
    nodes = nodes_by_name(graph)
    for block in structure.blocks:
        if masks is not None and block.name not in masks:
            continue
        for i, c in enumerate(block.consumers):
            node = nodes[c.node]
            width = block.n_units * (block.unit_size if c.role is Role.FLAT else 1)
            if masks is None:
                if i == 0:
                    mask = ir.Value(name=mask_input_name(block),
                                    type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([width]))
                    graph.inputs.append(mask)
            else:
                arr = channel_mask(block, masks[block.name], c.role)
                mask = ir.Value(name=f"{mask_input_name(block)}_{i}", const_value=ir.tensor(arr))
                graph.register_initializer(mask)
            data = node.inputs[c.data_index]
            mul = ir.Node("", "Mul", [data, mask], name=f"{node.name}__optin_mask")
            mul.outputs[0].name = f"{data.name}__masked_{i}_{block.name}"
            graph.insert_before(node, mul)
            node.replace_input_with(c.data_index, mul.outputs[0])
    return out
