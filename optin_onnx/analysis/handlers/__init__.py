"""One handler per op type, grouped by op family. A handler reads the tracks of a node's inputs
and writes those of its outputs, records what must be sliced or edited with each group, or marks a
barrier; an op without a handler on a live axis is a barrier (see the propagation)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.analysis.handlers.conv import batch_norm, conv, pad, pool, reduce
from optin_onnx.analysis.handlers.elementwise import BROADCAST, UNARY, elementwise
from optin_onnx.analysis.handlers.index_mapping import concat, split
from optin_onnx.analysis.handlers.layout import (flatten, reshape, shape, squeeze,
                                                 transpose, unsqueeze)
from optin_onnx.analysis.handlers.linear import gemm, matmul
from optin_onnx.analysis.handlers.normalization import layer_norm, softmax

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

HANDLERS: dict[str, Callable[[Propagator, ir.Node], None]] = {
    **{op: elementwise for op in UNARY | BROADCAST},
    "Transpose": transpose,
    "Reshape": reshape,
    "MatMul": matmul,
    "Gemm": gemm,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "LayerNormalization": layer_norm,
    "Shape": shape,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Conv": conv,
    "BatchNormalization": batch_norm,
    "Pad": pad,
    "Flatten": flatten,
    "Concat": concat,
    "Split": split,
    **{op: pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                            "GlobalMaxPool", "GlobalLpPool")},
    **{op: reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                              "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
}

#: Matrix products: the nodes whose MACs are counted (see :mod:`optin_onnx.flops`).
HEAVY = {"MatMul", "Gemm", "Conv"}

#: Ops that may read a flattened (channel, position) axis: per-element ops and the classifier.
FOLDED_OK = UNARY | {"Gemm", "MatMul"}

#: Ops that may read a folded (batch x units) axis: they keep axes whole, so the fold is carried.
LEAD_OK = UNARY | BROADCAST | {"Transpose", "MatMul", "Reshape", "Softmax", "LogSoftmax",
                               "Unsqueeze", "Squeeze"}
