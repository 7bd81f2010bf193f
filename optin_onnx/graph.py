"""Small helpers over onnx-ir graphs shared by every stage.

The stages refer to nodes by *name* (stable across copies and proto round trips), so the working
copy of a model gets unique node names once, in :func:`normalize`.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def normalize(model: ir.Model) -> ir.Model:
    """Give every node a unique, non-empty name (exporters leave some blank or repeat them)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy of the graph (the input model is never mutated) that shares the
    stored tensors: every pass replaces a constant by a new one rather than writing into it, so
    a copy costs the graph's nodes and values, not the weights again (a copy through protobuf
    held a model's worth of bytes per copy: four at once in a prune with the refit)."""
    return model.clone()


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {n.name: n for n in graph}


def const_root(value: ir.Value | None) -> ir.Value | None:
    """The value that holds the constant behind ``value`` (an initializer or a ``Constant``
    node's output), through ``Identity`` nodes as for :func:`const_array`; None if not constant.
    Two uses with the same root read one stored tensor: a weight shared on purpose (ALBERT's
    layers) or de-duplicated by the exporter."""
    for _ in range(64):
        if value is None:
            return None
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return value if const_array(value) is not None else None
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            return None
        value = node.inputs[0]
    return None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value``: an initializer, or the output of a ``Constant`` node, also
    when reached through ``Identity`` nodes (the TorchScript exporter de-duplicates equal weights,
    e.g. all-zero biases, and hands each layer an ``Identity`` of the one it kept). Read-only:
    copies of a model share their tensors (:func:`copy_model`), so a write would change every
    copy."""
    for _ in range(64):
        if value is None:
            return None
        if value.const_value is not None:
            return _read_only(value.const_value.numpy())
        node = value.producer()
        if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            break
        value = node.inputs[0]
    else:
        return None
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = next(iter(node.attributes.values()))
        if attr.name == "value":
            return _read_only(attr.value.numpy())
        if attr.name in ("value_float", "value_int"):
            return np.array(attr.value)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(list(attr.value))
    return None


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    out: list[ir.Graph] = []
    for a in node.attributes.values():
        if a.type == ir.AttributeType.GRAPH:
            out.append(a.value)
        elif a.type == ir.AttributeType.GRAPHS:
            out.extend(a.value)
    return out


def captured(node: ir.Node) -> list[ir.Value]:
    """Values of the enclosing graph that ``node``'s subgraphs read by name (implicit inputs)."""
    out: dict[str, ir.Value] = {}
    for g in subgraphs(node):
        local = {v.name for v in g.inputs} | set(g.initializers)
        for inner in g:
            local.update(v.name for v in inner.outputs if v is not None)
        for inner in g:
            for v in inner.inputs:
                if v is not None and v.name not in local and v.const_value is None:
                    out.setdefault(v.name, v)
            for v in captured(inner):
                if v.name not in local:
                    out.setdefault(v.name, v)
    return list(out.values())


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
