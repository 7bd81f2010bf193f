"""What the trajectory loss compares: the feature kind (F_z) and the output kind (L_KD's form).

Both are read off the graph when the user leaves them at ``auto``; resolving them here, apart from
the scorers, lets the pipeline and the tests ask what a model will be scored on without scoring it.
The kinds themselves are described in ``optin_onnx.scoring.trajectory``.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

import onnx_ir as ir

from optin_onnx.analysis import Structure, pre_layer_norm
from optin_onnx.errors import OptinError

FEATURE_KINDS = ("auto", "ffn", "residual-ln", "blocks")


def outputs_reached(model: ir.Model, structure: Structure) -> dict[str, list[str]]:
    """Per block, the graph outputs it can change (those downstream of one of its consumers), in
    graph-output order. A block need not reach every objective output: a decoder's layer-1
    cache output is computed before layer 1's MLP, an encoder's per-layer hidden states before
    the later layers."""
    out = {}
    for b in structure.blocks:
        consumers = {c.node for c in b.consumers}
        reached: set[str] = set()
        for node in model.graph:
            if node.name in consumers or any(v is not None and v.name in reached
                                             for v in node.inputs):
                reached.update(v.name for v in node.outputs if v is not None)
        out[b.name] = [v.name for v in model.graph.outputs if v.name in reached]
    return out


def dependent_outputs(model: ir.Model, structure: Structure) -> list[str]:
    """The graph outputs some prunable block can change, in graph-output order."""
    reached = {name for names in outputs_reached(model, structure).values() for name in names}
    return [v.name for v in model.graph.outputs if v.name in reached]


def objective_outputs(model: ir.Model, structure: Structure,
                      requested: Sequence[str] | None = None,
                      exclude: Collection[str] = ()) -> list[str]:
    """The graph outputs the output term (L_KD) compares: ``requested`` (``--objective-output``),
    in its order, or by default every output some block can change, in graph-output order.

    Why not every output: third-party exports return pass-throughs too, often first
    (``Identity(input_ids)``, the attention mask); pruning cannot move those, and their loss would
    be zero for every unit. Why not only the first dependent one: a sentence-embedding export
    returns both the token states and a pooled vector, and a unit can matter to one more than to
    the other. ``exclude`` names outputs that must never be an objective whatever is requested
    (a decoder's ``present.*`` KV-cache outputs, whose shape follows the kept heads, so teacher
    and student values cannot be compared)."""
    names = [v.name for v in model.graph.outputs]
    dependent = dependent_outputs(model, structure)
    if requested is None:
        chosen = [n for n in dependent if n not in exclude]
        if not chosen:
            raise OptinError("no graph output depends on a prunable block: nothing to score "
                             "against" + (f" (excluded: {', '.join(sorted(exclude))})"
                                          if dependent else ""))
        return chosen
    for name in requested:
        if name not in names:
            raise OptinError(f"--objective-output: the model has no output '{name}' (its "
                             f"outputs: {', '.join(names)})")
        if name in exclude:
            raise OptinError(f"--objective-output: output '{name}' cannot be an objective (its "
                             f"values are not comparable once pruned)")
        if name not in dependent:
            raise OptinError(f"--objective-output: output '{name}' does not depend on any "
                             f"prunable block, so pruning cannot change it")
    return list(dict.fromkeys(requested))


def outputs_left_out(model: ir.Model, structure: Structure, objectives: Collection[str],
                     exclude: Collection[str] = ()) -> dict[str, str]:
    """Every graph output that is not an objective, with why (for the report); ``exclude`` as
    given to :func:`objective_outputs`."""
    dependent = set(dependent_outputs(model, structure))
    cache = "a KV cache output (its shape follows the kept heads)"
    return {v.name: ("no prunable block reaches it" if v.name not in dependent else
                     cache if v.name in exclude else "not chosen by --objective-output")
            for v in model.graph.outputs if v.name not in objectives}


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
