"""What the trajectory loss compares: the feature kind (F_z) and the output kind (L_KD's form).

Both are read off the graph when the user leaves them at ``auto``; resolving them here, apart from
the scorers, lets the pipeline and the tests ask what a model will be scored on without scoring it.
The kinds themselves are described in ``optin_onnx.scoring.trajectory``.
"""
from __future__ import annotations

import onnx_ir as ir

from optin_onnx.analysis import Structure, pre_layer_norm
from optin_onnx.errors import OptinError

FEATURE_KINDS = ("auto", "ffn", "residual-ln", "blocks")


def objective_output(model: ir.Model, structure: Structure) -> str:
    """The graph output the output term (L_KD) compares: the first one that some block can
    change. Third-party exports put pass-throughs first (``Identity(input_ids)``, the attention
    mask): pruning cannot move those, and a loss on them would be zero for every unit."""
    consumers = {c.node for b in structure.blocks for c in b.consumers}
    reached: set[str] = set()
    for node in model.graph:
        if node.name in consumers or any(v is not None and v.name in reached
                                         for v in node.inputs):
            reached.update(v.name for v in node.outputs if v is not None)
    for v in model.graph.outputs:
        if v.name in reached:
            return v.name
    raise OptinError("no graph output depends on a prunable block: nothing to score against")


def output_kind(model: ir.Model, name: str, rank: int, requested: str) -> str:
    """``requested``, with ``auto`` resolved from output ``name`` of rank ``rank``: ``tokens``
    (one vector per token), ``logits`` (made by a final linear layer) or ``embedding``."""
    if requested != "auto":
        return requested
    if rank >= 3:
        return "tokens"
    producer = next((n for n in model.graph if name in [o.name for o in n.outputs]), None)
    if producer is not None and producer.op_type in ("Gemm", "MatMul"):
        return "logits"
    if producer is not None and producer.op_type == "Add" and any(
            v.producer() is not None and v.producer().op_type == "MatMul" for v in producer.inputs):
        return "logits"
    return "embedding"


def feature_kind(model: ir.Model, structure: Structure, requested: str) -> str:
    """``requested``, with ``auto`` resolved: blocks for CNNs, residual-ln for pre-LN models,
    else ffn."""
    if requested not in FEATURE_KINDS:
        raise OptinError(f"feature kind must be one of {', '.join(FEATURE_KINDS)}, got '{requested}'")
    channels = any(b.kind == "channels" for b in structure.blocks)
    # A transformer has attention; a CNN's fully connected classifier layers are MLP blocks too.
    transformer = any(b.kind == "attention" for b in structure.blocks)
    if requested == "blocks" and not channels:
        raise OptinError("feature kind 'blocks' needs conv channel groups; use 'ffn' or "
                         "'residual-ln' for this model")
    if requested in ("ffn", "residual-ln") and not any(b.kind != "channels"
                                                       for b in structure.blocks):
        raise OptinError(f"feature kind '{requested}' needs attention or MLP blocks; use "
                         f"'blocks' for conv channel groups")
    if requested != "auto":
        return requested
    if channels and not transformer:
        return "blocks"
    # A transformer with a conv head (a dense decoder): the transformer's own features; the
    # head's channel groups come after every layer and are scored by the output term.
    return "residual-ln" if pre_layer_norm(model, structure) else "ffn"
