"""Static shapes for the passes that must prove a dimension before they rewrite.

TorchScript exports carry no shapes on intermediate values; the dynamo exporter writes them (from
torch's own symbolic shapes). :func:`static_shapes` runs ONNX's shape inference with data
propagation on a copy of the graph (the model is not touched, so no stale shape survives a later
prune) and merges what the graph already says. A dimension is an ``int`` when static, a ``str``
when symbolic (two equal names are the same size: inference derived both from one source, such
as ``Shape(h)[0]`` or the graph input's ``batch``), ``None`` when unknown.
"""
from __future__ import annotations

import math

import onnx
import onnx_ir as ir

Dim = int | str | None
Shapes = dict[str, tuple[Dim, ...]]

# Initializers above this many elements go to shape inference as typed inputs without data: the
# weights' shapes are all it needs, and a BERT-base proto would otherwise be copied whole.
_DATA_LIMIT = 1024


def _dims(shape: ir.Shape) -> tuple[Dim, ...]:
    return tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in shape)


def _stripped_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large initializers are graph inputs (type and shape only)."""
    proto = ir.to_proto(model)
    declared = {i.name for i in proto.graph.input}  # old models list initializers as inputs too
    keep = []
    for t in proto.graph.initializer:
        if len(t.dims) and math.prod(t.dims) > _DATA_LIMIT:
            if t.name not in declared:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(
                    t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return proto


def static_shapes(model: ir.Model) -> Shapes:
    """Every value's static shape that is known, by name (see the module docstring)."""
    out: Shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_stripped_proto(model), data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        # Inference refused the graph (a malformed or unknown construct): only what the graph
        # declares is known, and the passes rewrite less.
        inferred = None
    if inferred is not None:
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            t = info.type.tensor_type
            if t.HasField("shape"):
                out[info.name] = tuple(d.dim_value if d.HasField("dim_value") else
                                       (d.dim_param or None) for d in t.shape.dim)
    for node in model.graph:
        for v in node.outputs:
            if v.shape is not None:
                out[v.name] = _dims(v.shape)
    for v in [*model.graph.inputs, *model.graph.initializers.values()]:
        if v.shape is not None:
            out[v.name] = _dims(v.shape)
        elif v.const_value is not None:
            out[v.name] = tuple(v.const_value.shape)
    return out
