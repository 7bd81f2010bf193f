"""Normalisations: Softmax and LayerNormalization over another axis keep it; over the axis they
are barriers (LayerNorm over the model width is the natural end of the residual stream)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from optin_onnx.graph import attr

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator


def softmax(p: Propagator, node: ir.Node) -> None:
    rank = len(p.shape(node.inputs[0]))
    opset = p.graph.opset_imports.get("", 13)
    axis = attr(node, "axis", -1 if opset >= 13 else 1) % rank
    normalised = {axis} if opset >= 13 else set(range(axis, rank))
    p.keep_unless_on(node, normalised, "normalises over the axis")


def layer_norm(p: Propagator, node: ir.Node) -> None:
    rank = len(p.shape(node.inputs[0]))
    axis = attr(node, "axis", -1) % rank
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"LayerNormalization '{node.name}' takes the axis as a parameter")
    p.keep_unless_on(node, set(range(axis, rank)), "normalises over the axis", natural=True)
