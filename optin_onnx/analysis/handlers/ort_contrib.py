"""onnxruntime's contrib ops (domain ``com.microsoft``) that its transformer optimizer writes, so
a graph can be pruned after fusion as well as before:

- ``BiasGelu``, ``FastGelu`` (x + bias, then GELU): element-wise, the bias sliced with the axis;
  ``Gelu``, ``QuickGelu``: element-wise.
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (residual add + LayerNorm) and
  ``SimplifiedLayerNormalization`` (RMSNorm): normalise over the model width, a natural end.
- ``MultiHeadAttention`` (Q, K, V projected outside, ``num_heads`` heads): couples the three
  projections' groups into one heads group, ``num_heads`` and the packed bias shrink with it.
- ``Attention`` (projections inside) starts a group: see :func:`.sources.ort_attention`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.handlers.elementwise import elementwise
from optin_onnx.analysis.structure import AttrEdit, ParamSlice, Role
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator


def bias_activation(p: Propagator, node: ir.Node) -> None:
    """``BiasGelu(x, bias)`` / ``FastGelu(x, bias?)``: as ``Gelu(x + bias)``."""
    elementwise(p, node)


def skip_layer_norm(p: Propagator, node: ir.Node) -> None:
    for v in node.inputs:
        for gid, role in p.track(v).values():
            if role is not Role.INNER:
                p.barrier(gid, f"{node.op_type} '{node.name}' normalises over the axis",
                          natural=True)


def heads_axis_inputs(p: Propagator, node: ir.Node, bias: int, past: tuple[int, ...]
                      ) -> str | None:
    """Why a fused attention's optional inputs stop head pruning, or None: a past key/value state
    has a heads axis (its cache layout would change), and so may an attention bias or mask
    ``[B, H, S, L]`` (one broadcast over heads, or one of rank 2, is harmless). Key padding masks
    have none."""
    present = [i for i in past if i < len(node.inputs) and node.inputs[i] is not None]
    if present:
        return f"a past key/value state (inputs {present}): not pruned through yet"
    if bias < len(node.inputs) and node.inputs[bias] is not None:
        dims = p.shape(node.inputs[bias])
        if dims is None or (len(dims) >= 3 and dims[-3] != 1):
            return "an attention bias with a heads axis: not pruned through yet"
    return None


def multi_head_attention(p: Propagator, node: ir.Node) -> None:
    """``MultiHeadAttention(q [B,S,H*D], k [B,L,H*D], v [B,L,H*Dv], bias?, ...)`` -> [B,S,H*Dv]."""
    heads = attr(node, "num_heads", 0)
    qkv = node.inputs[:3]
    tracks = [p.track(v).get(2) for v in qkv if v is not None]
    live = [t for t in tracks if t is not None]
    why = None
    if len(qkv) < 3 or any(v is None for v in qkv) or len(live) != 3:
        why = "packed or untracked Q/K/V: not pruned through yet"
    elif any(len(p.shape(v)) != 3 for v in qkv):
        why = "Q/K/V not in [batch, sequence, heads x head size] form: not pruned through yet"
    elif any(r is not Role.FLAT for _, r in live) or not heads:
        why = "Q/K/V axes already split into heads: not pruned through yet"
    if why is None:
        why = heads_axis_inputs(p, node, bias=5, past=(6, 7))
    for v in node.inputs:
        for gid, _ in p.track(v).values():
            p.group(gid).nodes.append(node.name)
    if why is not None:
        for t in live:
            p.barrier(t[0], f"MultiHeadAttention '{node.name}': {why}")
        return
    gid = live[0][0]
    for t in live[1:]:
        gid = p.union(gid, t[0])
    g = p.group(gid)
    widths = [p.shape(v)[2] for v in qkv]
    unit = widths[2] // heads
    if len(set(widths)) != 1 or widths[2] % heads:
        return p.barrier(gid, f"MultiHeadAttention '{node.name}' has Q/K/V widths {widths} for "
                              f"{heads} heads")
    if g.unit_size is None:
        g.unit_size = unit
    elif g.unit_size != unit:
        return p.barrier(gid, f"MultiHeadAttention '{node.name}' splits units of {unit}, "
                              f"elsewhere {g.unit_size}")
    g.has_head = True
    g.attr_edits.append(AttrEdit(node.name, "num_heads", Role.HEAD))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        if const_array(node.inputs[3]) is None:
            return p.barrier(gid, f"MultiHeadAttention '{node.name}' has a run-time bias")
        for offset in np.cumsum([0] + widths[:2]):
            g.slices.append(ParamSlice(node.name, 3, 0, Role.FLAT, offset=int(offset)))
    p.tracks[node.outputs[0].name] = {2: (p.find(gid), Role.FLAT)}
