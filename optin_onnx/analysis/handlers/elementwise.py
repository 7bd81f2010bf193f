"""Element-wise and broadcasting ops: every axis kept, operands of one axis merged."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.analysis.groups import Track

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

UNARY = {
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal",
    "Identity", "Cast", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
    "Selu", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Mish", "IsNaN", "IsInf", "Not",
    "Clip", "Dropout", "ThresholdedRelu", "Shrink",
}
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "Sum", "Mean", "BitShift",
}


def elementwise(p: Propagator, node: ir.Node) -> None:
    out_v = node.outputs[0]
    out_shape = p.shape(out_v)
    if out_shape is None:
        return p.barrier_all(p.track(node.inputs[0]), f"no shape for '{out_v.name}'")
    r = len(out_shape)
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    if node.op_type in UNARY:
        data = data[:1]
        for v in node.inputs[1:]:
            p.barrier_all(p.track(v), f"{node.op_type} '{node.name}' takes the axis as a parameter")
    out: Track = {}
    for a in range(r):
        entries = []
        for i, v in data:
            s = p.shape(v)
            if s is not None and a - (r - len(s)) >= 0:
                entries.append((i, v, a - (r - len(s))))
        p.merge_axis(node, entries, a, out)
    if out:
        p.tracks[out_v.name] = out
