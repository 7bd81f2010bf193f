"""Constant Slice bounds where the exporter computes them from the sliced tensor's static width.

TorchScript writes ``torch.chunk(y, 2, dim=-1)`` (Phi-3's ``gate_up_proj``, ModernBERT's GeGLU
``Wi``) with bounds computed at run time from the width of ``y``:

    y --Shape--Gather(-1)--Add(1)--Div(2)--Mul(1)--> h --Mul(2)--> 2h
    |                                                |              |
    +--Slice(starts=0, ends=h, axes=-1)-----> gate  |              |
    +--Slice(starts=h, ends=2h, axes=-1)----------> up

When every dimension those bounds read is static (the width of a product with a constant weight
is), the bounds are the same numbers on every run: they become constants, the shape arithmetic
dies, and :mod:`~optin_onnx.passes.unfuse_projections` sees the constant Slices it splits. Only
bounds built from constants and ``Shape`` reads of the sliced tensor itself are folded; one
that reads any other size (the sequence length, another tensor) is left as it is.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optin_onnx.graph import attr, const_array
from optin_onnx.passes._shapes import Shapes, static_shapes

_DEFAULT = ("", "ai.onnx")
_INTEGERS = {ir.DataType.INT32, ir.DataType.INT64}
_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """ONNX integer Div: truncation toward zero; None on a division by zero."""
    if np.any(b == 0):
        return None
    return np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))


class _Folder:
    """Evaluates the integer shape arithmetic behind one sliced tensor's bounds. A value is an
    object array of ints, with None for a dimension that is not static."""

    def __init__(self, data: ir.Value, shapes: Shapes):
        self.data = data
        self.shapes = shapes

    def known(self, value: ir.Value) -> np.ndarray | None:
        """``value`` as an int64 array when every element is known."""
        arr = self.fold(value, 0)
        if arr is None or any(e is None for e in arr.reshape(-1)):
            return None
        return arr.astype(np.int64)

    def fold(self, value: ir.Value, depth: int) -> np.ndarray | None:
        const = const_array(value)
        if const is not None:
            if not np.issubdtype(const.dtype, np.integer):
                return None
            return np.asarray(const).astype(object)
        node = value.producer()
        if node is None or node.domain not in _DEFAULT or depth > 32:
            return None
        op = node.op_type
        if op == "Shape":
            if node.inputs[0] is not self.data or self.data.name not in self.shapes:
                return None
            dims = self.shapes[self.data.name]
            start, end = attr(node, "start", 0), attr(node, "end", len(dims))
            return np.array([d if isinstance(d, int) else None for d in dims[start:end]],
                            dtype=object)
        args = [self.fold(v, depth + 1) if v is not None else None for v in node.inputs]
        if args[0] is None:
            return None
        if op in ("Identity", "Cast"):
            return args[0] if op == "Identity" or attr(node, "to") in _INTEGERS else None
        if op in ("Squeeze", "Unsqueeze"):  # the scalar <-> [1] changes of shape arithmetic
            return None if args[0].size != 1 else \
                args[0].reshape(1 if op == "Unsqueeze" else ())
        if op == "Gather" and attr(node, "axis", 0) == 0 and args[1] is not None \
                and args[0].ndim == 1 and all(e is not None for e in args[1].reshape(-1)):
            index = args[1].astype(np.int64)
            if np.any(index >= len(args[0])) or np.any(index < -len(args[0])):
                return None
            return np.array(args[0][index], dtype=object)
        if op == "Concat" and all(a is not None for a in args):
            return np.concatenate([a.reshape(-1) for a in args])
        if op in _ARITHMETIC or op == "Div":
            if args[1] is None or any(e is None for a in args for e in a.reshape(-1)):
                return None
            a, b = (x.astype(np.int64) for x in args)
            out = _int_div(a, b) if op == "Div" else _ARITHMETIC[op](a, b)
            return None if out is None else np.asarray(out).astype(object)
        return None


def fold_slice_bounds(model: ir.Model, shapes: Shapes | None = None) -> int:
    """Replace run-time Slice bounds computed from the sliced tensor's static dimensions by
    constants (in place); returns how many Slices changed. ``shapes``: the model's
    :func:`~optin_onnx.passes._shapes.static_shapes`, when the caller has them already."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Slice" or node.domain not in _DEFAULT or len(node.inputs) < 3:
            continue
        bounds = [(i, v) for i, v in enumerate(node.inputs) if i and v is not None]
        if all(const_array(v) is not None for _, v in bounds):
            continue
        shapes = static_shapes(model) if shapes is None else shapes
        folder = _Folder(node.inputs[0], shapes)
        folded = [(i, v, folder.known(v)) for i, v in bounds if const_array(v) is None]
        if any(arr is None for _, _, arr in folded):
            continue
        for i, v, arr in folded:
            name = f"{node.name}__bound{i}"
            c = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
            model.graph.register_initializer(c)
            node.replace_input_with(i, c)
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count
