"""onnxruntime's contrib ops (domain ``com.microsoft``) that its transformer optimizer writes, so
a graph can be pruned after fusion as well as before:

- ``BiasGelu``, ``FastGelu`` (x + bias, then GELU): element-wise, the bias sliced with the axis;
  ``Gelu``, ``QuickGelu``: element-wise.
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (residual add + LayerNorm) and
  ``SimplifiedLayerNormalization`` (RMSNorm): normalise over the model width, a natural end.
- ``MultiHeadAttention`` (Q, K, V projected outside, ``num_heads`` heads): couples the three
  projections' groups into one heads group, ``num_heads`` and the packed bias shrink with it.
- ``GroupQueryAttention`` (Q from ``num_heads`` heads, K and V from ``kv_num_heads``): one unit is
  a key/value head with the query heads that read it; both head counts shrink with it.
- A fused attention's past key/value inputs and present outputs (a KV cache on the interface)
  shrink with the heads kept: ports of the block, as for an unfused cache.
- ``RotaryEmbedding`` rotates within each head: a heads axis passes, the head size is never cut,
  and on the 3-D form ``[B, S, H*D]`` its ``num_heads`` shrinks with the heads.
- ``Attention`` (projections inside) starts a group: see :func:`.sources.ort_attention`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.cache import reads_axis, source_input, written_out
from optin_onnx.analysis.handlers.elementwise import elementwise
from optin_onnx.analysis.structure import AttrEdit, ParamSlice, Port, Role
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


def cache_ports(p: Propagator, node: ir.Node, gid: int, pairs: tuple[tuple[int, int], ...],
                group: int = 1) -> str | None:
    """Record a fused attention's KV cache as ports of group ``gid``: each (past input, present
    output) slot pair ``[B, heads, length, head size]``, the past a graph input that nothing else
    reads on its heads axis, the present a graph output that nothing in the graph reads. Returns
    why not, recording nothing, where that does not hold."""
    ports = []
    for i, o in pairs:
        past = node.inputs[i] if i < len(node.inputs) else None
        present = node.outputs[o] if o < len(node.outputs) else None
        if past is not None:
            source = source_input(past)
            if source is None or len(p.shape(past) or ()) != 4 or \
                    reads_axis(source, 1, 4, node):
                return f"past state input {i} is not a graph input read only here"
            ports.append(Port(source.name, False, 1, Role.HEAD, group))
        if present is not None and (present.uses() or present.is_graph_output()):
            if not written_out(present):
                return f"present state output {o} is read inside the graph"
            ports.append(Port(present.name, True, 1, Role.HEAD, group))
    p.group(gid).ports.extend(ports)
    return None


def group_query_attention(p: Propagator, node: ir.Node) -> None:
    """``GroupQueryAttention(q [B,S,Hq*D], k [B,L,Hkv*D], v [B,L,Hkv*D], past_key?,
    past_value?, seqlens_k, total_sequence_length, cos?, sin?, ...)`` -> [B,S,Hq*D], present
    key and value [B,Hkv,T,D]: see :func:`joined_heads`. Rotary caches ``[length, D/2]`` have no
    heads axis."""
    live = [p.track(v)[2][0] for v in node.inputs[:3] if v is not None and 2 in p.track(v)]
    why = None
    if len(live) != 3 or any(v is None or p.track(v).keys() - {2} for v in node.inputs[:3]):
        why = "packed or untracked Q/K/V: not pruned through yet"
    else:
        why = joined_heads(p, node, "num_heads", attr(node, "num_heads", 0),
                           attr(node, "kv_num_heads", 0))
    if why is None:
        why = cache_ports(p, node, p.track(node.outputs[0])[2][0], ((3, 1), (4, 2)))
        if why is not None:
            p.tracks.pop(node.outputs[0].name, None)
    for v in node.inputs:
        for gid, _ in p.track(v).values():
            p.group(gid).nodes.append(node.name)
    if why is not None:
        for gid in live:
            p.barrier(gid, f"{node.op_type} '{node.name}': {why}")


def joined_heads(p: Propagator, node: ir.Node, q_attr: str, heads: int, kv_heads: int
                 ) -> str | None:
    """Join the groups of a fused op's projections ``q [B,S,Hq*D]``, ``k``, ``v [B,L,Hkv*D]``
    (its first three inputs, each tracked on axis 2) into one heads group, and track its output
    ``[B,S,Hq*D]``; or return why not. Query heads h*n .. h*n + n - 1 read key/value head h
    (n = Hq / Hkv): the query side is regrouped by n (see :meth:`Groups.regroup`), so a unit is
    a key/value head with its query heads; ``q_attr`` (the query head count) shrinks by n per
    unit dropped, ``kv_num_heads`` (where n > 1 or the op has it) by one."""
    qkv = node.inputs[:3]
    if any(len(p.shape(v)) != 3 or p.track(v)[2][1] is not Role.FLAT for v in qkv):
        return "Q/K/V not in [batch, sequence, heads x head size] form"
    if not heads or not kv_heads or heads % kv_heads:
        return f"{heads} query heads over {kv_heads} key/value heads"
    widths = [p.shape(v)[2] for v in qkv]
    if widths[0] % heads or widths[1] % kv_heads or widths[1] != widths[2] or \
            widths[0] // heads != widths[1] // kv_heads:
        return f"Q/K/V widths {widths} for {heads} and {kv_heads} heads"
    if any(p.group_of(v, 2) != 1 for v in qkv):
        return "Q/K/V already grouped"
    n_rep, unit = heads // kv_heads, widths[1] // kv_heads
    tracks = [p.track(v)[2][0] for v in qkv]
    if n_rep > 1:
        p.regroup(tracks[0], n_rep)
    gid = p.union(p.union(tracks[0], tracks[1]), tracks[2])
    g = p.group(gid)
    if g.unit_size not in (None, unit):
        return f"units of {unit} here, {g.unit_size} elsewhere"
    g.unit_size, g.has_head = unit, True
    g.attr_edits.append(AttrEdit(node.name, q_attr, Role.HEAD, group=n_rep))
    if "kv_num_heads" in node.attributes:
        g.attr_edits.append(AttrEdit(node.name, "kv_num_heads", Role.HEAD))
    out = node.outputs[0].name
    p.tracks[out] = {2: (p.find(gid), Role.FLAT)}
    if n_rep > 1:
        p.grouping[(out, 2)] = n_rep
    return None


def rotary_embedding(p: Propagator, node: ir.Node) -> None:
    """``RotaryEmbedding(x, position_ids, cos_cache, sin_cache)``: x ``[B, H, S, D]`` or
    ``[B, S, H*D]`` (then ``num_heads`` says H), each head rotated on its own within D. The
    caches ``[length, D/2]`` and the positions have no heads axis."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"RotaryEmbedding '{node.name}' takes the axis as a parameter")
    rank, heads = len(p.shape(node.inputs[0]) or ()), attr(node, "num_heads", 0)
    for a, (gid, role) in t.items():
        why = None
        if role is Role.INNER or (rank == 4 and a == 1 and role is Role.HEAD):
            continue
        if rank == 3 and a == 2 and role is Role.FLAT and heads:
            g = p.group(gid)
            size = p.shape(node.inputs[0])[2] // heads
            if p.shape(node.inputs[0])[2] % heads or g.unit_size not in (None, size):
                why = f"rotates heads of {size} channels, units of {g.unit_size} elsewhere"
            else:
                g.unit_size, g.has_head = size, True
                g.attr_edits.append(AttrEdit(node.name, "num_heads", Role.HEAD,
                                             group=p.group_of(node.inputs[0], a)))
                continue
        why = why or "rotates across the axis"
        return p.barrier_all(t, f"RotaryEmbedding '{node.name}' {why}")
    p.tracks[node.outputs[0].name] = dict(t)


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
        why = heads_axis_inputs(p, node, bias=5, past=())
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
    why = cache_ports(p, node, gid, ((6, 1), (7, 2)))
    if why is not None:
        return p.barrier(gid, f"MultiHeadAttention '{node.name}': {why}")
    p.tracks[node.outputs[0].name] = {2: (p.find(gid), Role.FLAT)}
