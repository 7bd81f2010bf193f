"""One handler per op type, grouped by op family. A handler reads the tracks of a node's inputs
and writes those of its outputs, records what must be sliced or edited with each group, or marks a
barrier; an op without a handler on a live axis is a barrier (see the propagation). Registries are
keyed by (domain, op type): the default ONNX domain is "" and onnxruntime's is "com.microsoft"."""
from __future__ import annotations

from collections.abc import Callable

from optin_onnx.analysis.handlers import ort_contrib, sources
from optin_onnx.analysis.handlers.attention import attention
from optin_onnx.analysis.handlers.conv import batch_norm, conv, pad, pool, reduce, resize
from optin_onnx.analysis.handlers.elementwise import BROADCAST, UNARY, elementwise
from optin_onnx.analysis.handlers.index_mapping import concat, gather_elements, split
from optin_onnx.analysis.handlers.layout import (flatten, reshape, shape, slice_, squeeze,
                                                 transpose, unsqueeze)
from optin_onnx.analysis.handlers.repeat import expand, tile
from optin_onnx.analysis.handlers.linear import gemm, matmul
from optin_onnx.analysis.handlers.normalization import layer_norm, softmax

#: ``handler(propagator, node)``: reads and writes the propagator's tracks and groups.
Handler = Callable[..., None]

_ONNX: dict[str, Handler] = {
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
    "Slice": slice_,
    "Expand": expand,
    "Tile": tile,
    "GatherElements": gather_elements,
    "Conv": conv,
    "BatchNormalization": batch_norm,
    "Pad": pad,
    "Resize": resize,
    "Upsample": resize,
    "Flatten": flatten,
    "Concat": concat,
    "Split": split,
    "Attention": attention,
    **{op: pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                            "GlobalMaxPool", "GlobalLpPool")},
    **{op: reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                              "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
}

ORT = "com.microsoft"

_ORT: dict[str, Handler] = {
    "BiasGelu": ort_contrib.bias_activation,
    "FastGelu": ort_contrib.bias_activation,
    "Gelu": elementwise,
    "QuickGelu": elementwise,
    "SkipLayerNormalization": ort_contrib.skip_layer_norm,
    "SkipSimplifiedLayerNormalization": ort_contrib.skip_layer_norm,
    "SimplifiedLayerNormalization": ort_contrib.skip_layer_norm,
    "MultiHeadAttention": ort_contrib.multi_head_attention,
    "GroupQueryAttention": ort_contrib.group_query_attention,
    "RotaryEmbedding": ort_contrib.rotary_embedding,
}

HANDLERS: dict[tuple[str, str], Handler] = {
    **{("", op): h for op, h in _ONNX.items()},
    **{("ai.onnx", op): h for op, h in _ONNX.items()},
    **{(ORT, op): h for op, h in _ORT.items()},
}

#: Ops that start a group on their output channels (see :mod:`.sources`).
SOURCES: dict[tuple[str, str], Handler] = {
    **{(d, op): h for d in ("", "ai.onnx")
       for op, h in (("Conv", sources.conv), ("MatMul", sources.matmul), ("Gemm", sources.gemm))},
    (ORT, "Attention"): sources.ort_attention,
}

#: Matrix products: the nodes whose MACs are counted (see :mod:`optin_onnx.flops`).
HEAVY = {"MatMul", "Gemm", "Conv", "Attention", "MultiHeadAttention", "GroupQueryAttention"}

#: Ops that may read a flattened (channel, position) axis: per-element ops and the classifier.
FOLDED_OK = UNARY | {"Gemm", "MatMul"}

#: Ops that may read a folded (batch x units) axis: they keep axes whole, so the fold is carried
#: (Tile folds it further; GatherElements is element-wise on it), or, Shape, read its size only
#: into targets whose handlers compare the fold.
LEAD_OK = UNARY | BROADCAST | {"Transpose", "MatMul", "Reshape", "Softmax", "LogSoftmax",
                               "Unsqueeze", "Squeeze", "Slice", "Expand", "Tile",
                               "GatherElements", "Shape"}
