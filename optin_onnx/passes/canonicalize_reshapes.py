"""Stage *canonicalize*: constant Reshape targets where the exporter computed them at run time.

Exporters write a head split as ``Reshape(q, Concat(Unsqueeze(Gather(Shape(h), 0)),
Unsqueeze(Gather(Shape(h), 1)), [-1], [64]))``: five to seven small nodes per Reshape, run on
every inference. When each run-time element just copies the Reshape input's own dimension at the
same position, ONNX says it with a 0 (``allowzero=0``): the target becomes the constant
``[0, 0, -1, 64]``, dynamic axes stay dynamic, and the shape nodes die: per-node overhead is what
limits batch-1 latency (docs/RESULTS.md, "One-off measurements").

A ``-1`` whose output dimension is the same at both probe sizes (the head count of a head split:
``[0, 0, -1, 64]``) is written out too (``[0, 0, 9, 64]``), in run-time and constant targets alike:
onnxruntime's transformer fusion reads each layer's head count from there, and with ``-1`` it
cannot fuse the attention of a pruned model whose layers have different head counts.

The equality "element k == input dim k" is checked on two probe runs of different batch and
sequence sizes, and every prune ends with the verify stage, which runs the final graph at other
sizes again.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optin_onnx.analysis.shapes import ConstElement, DimElement, trace_element
from optin_onnx.graph import attr, const_array


def _target(node: ir.Node, probes: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """The constant equivalent of ``node``'s run-time target, or None if it is not provable."""
    data, target, result = node.inputs[0], node.inputs[1], node.outputs[0]
    const = const_array(target)
    if const is not None:
        return _explicit(np.asarray(const, np.int64).reshape(-1), result, probes, const)
    if any(target.name not in p or data.name not in p for p in probes):
        return None
    n = probes[0][target.name].size
    out = []
    for k in range(n):
        elem = trace_element(target, k, probes[0])
        if isinstance(elem, ConstElement):
            if elem.value == 0 and attr(node, "allowzero", 0):
                return None  # a literal 0 (allowzero) is not "copy the input's dim"
            out.append(elem.value)
        elif isinstance(elem, DimElement) and all(
                k < p[data.name].ndim and elem.value in p and elem.axis < p[elem.value].ndim
                and p[elem.value].shape[elem.axis] == p[data.name].shape[k] for p in probes):
            out.append(0)
        else:
            return None
    arr = np.asarray(out, dtype=np.int64)
    if (arr == -1).sum() > 1:
        return None
    # The constant must reproduce the probed targets wherever it is explicit.
    for p in probes:
        explicit = arr > 0
        if not np.array_equal(arr[explicit], p[target.name].reshape(-1)[explicit]):
            return None
    return _explicit(arr, result, probes)


def _explicit(arr: np.ndarray, result: ir.Value, probes: list[dict[str, np.ndarray]],
              unchanged: np.ndarray | None = None) -> np.ndarray | None:
    """``arr`` with its -1 written out where the output has that dimension at every probe size;
    None when that changes nothing in a target that was ``unchanged`` already."""
    free = np.flatnonzero(arr == -1)
    if free.size == 1 and all(result.name in p and p[result.name].ndim == arr.size
                              for p in probes):
        dims = {p[result.name].shape[free[0]] for p in probes}
        if len(dims) == 1:
            arr = arr.copy()
            arr[free[0]] = dims.pop()
    if unchanged is not None and np.array_equal(arr, np.reshape(unchanged, -1)):
        return None
    return arr


def canonicalize_reshapes(model: ir.Model, probes: list[dict[str, np.ndarray]]) -> int:
    """Replace provable run-time Reshape targets by constants and write out static -1s (in
    place); returns how many targets changed."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        arr = _target(node, probes)
        if arr is None:
            continue
        if node.inputs[1].const_value is None and attr(node, "allowzero", 0):
            # Our 0s mean "copy the input's dim" (the dynamo exporter sets allowzero=1, where a
            # 0 would be literal); no element of the new target is a literal 0.
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        name = f"{node.name}__shape"
        value = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
        model.graph.register_initializer(value)
        node.replace_input_with(1, value)
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count
