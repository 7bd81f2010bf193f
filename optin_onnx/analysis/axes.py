"""Axis-group propagation: find every channel axis that can shrink, whatever the exporter wrote.

Each MatMul/Gemm with a constant weight *starts* a group on its output-channel axis. One forward
pass over the graph (in topological order) carries every group's axis through the ops that keep it
(one handler per op type), until a MatMul/Gemm contracts it against a constant weight: a
*consumer*, the end of the group. Ops that couple two groups on the same axis (Q and K in
``Q @ K^T``, P and V in ``P @ V``) merge them. Along the way each handler records the constants that
must be sliced with the group (biases, per-head scales) and the shape constants that spell out its
size (a Reshape's head count).

Anything without a handler on a live axis is a *barrier*: the group is declined, with the reason,
never guessed. Reaching a graph output or a residual add is also a barrier; that is how the model
width (the residual stream) is kept out of every group.

The attention pattern, as the handlers see it (every exporter and onnxsim produce a variant):

    x --MatMul(Wq)+bq--Reshape[.., H, D]--Transpose--+
                                                     MatMul(QK^T)--Mul--Add(mask)--Softmax--+
    x --MatMul(Wk)+bk--Reshape[.., H, D]--Transpose--+                                      |
    x --MatMul(Wv)+bv--Reshape[.., H, D]--Transpose-------------------------------- MatMul(PV)
                                                                                         |
                                          residual <-- +bo <-- MatMul(Wo) <-- Reshape[.., H*D]

The head axis (HEAD) is a batch axis of both attention MatMuls, D (INNER) is contracted inside a
head, and Wo contracts H*D (FLAT): one group, with unit size D. An FFN is a group with unit size 1:

    x --MatMul(W1)+b1--act(...)--MatMul(W2)+b2--> residual

CNNs are the same idea on axis 1 of NCHW maps. Each ``Conv`` (group 1) with a constant weight
starts a group on its output channels and ends the group of its input channels; BatchNormalization,
activations, pooling and Pad keep the axis; a depthwise conv keeps it too (its weight, bias and
``group`` attribute shrink with it); a residual ``Add`` or a squeeze-excite ``Mul`` couples the
groups of its operands, so every conv that writes one residual stream lands in one group:

    x --Conv(W1)--BN--Relu--Conv(W2)--BN--+--Relu--> (next block's convs: consumers)
    |                                     |
    +------------(shortcut)---------------+

``Flatten`` (or a Reshape) of an [N, C, H, W] map into [N, C*H*W] keeps the channel axis with a
*repeat* of H*W: the classifier's weight rows c*H*W .. c*H*W + H*W - 1 belong to channel c.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.shapes import ConstElement, DimElement, trace_element
from optin_onnx.analysis.structure import Consumer, ParamSlice, Role, ShapeEdit
from optin_onnx.graph import attr, const_array

Track = dict[int, tuple[int, Role]]  # axis -> (group id, role)

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


@dataclass
class Group:
    id: int
    width: int
    unit_size: int | None = None
    has_head: bool = False
    sources: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    group_edits: list[str] = field(default_factory=list)  # depthwise convs on the axis
    # A composite: the output axis of a channel Concat, made of these (group, channel offset)
    # parts. What is recorded on it is handed to the parts, with offsets, at the end of the pass.
    parts: list[tuple[int, int]] = field(default_factory=list)
    # True once something other than a natural end (residual add, normalisation over the axis, a
    # graph output) stopped the group; ``natural`` once such an end did. A group without consumers
    # is worth reporting only when it is hard and not natural: a natural end marks the model
    # width (a transformer's residual stream), which is never a block whatever else stops it.
    hard: bool = False
    natural: bool = False


class Propagator:
    """One forward pass that builds every group. Use :func:`propagate`."""

    def __init__(self, model: ir.Model, probe: dict[str, np.ndarray]):
        self.graph = model.graph
        self.probe = probe
        self.tracks: dict[str, Track] = {}
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        # (value, axis) -> H*W where a Flatten folded positions into the channel axis
        self.repeat: dict[tuple[str, int], int] = {}
        # (node, group, "in" | "out"): a matrix-product node whose MACs scale with the group's width
        self.mac_axes: list[tuple[str, int, str]] = []

    # -- union-find over groups -------------------------------------------------------------
    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def layout(self, g: Group) -> list[tuple[int, int]]:
        return [(self.find(p), o) for p, o in g.parts]

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.groups[b].parts and not self.groups[a].parts:
            a, b = b, a  # a composite stays the root: the plain group's channels split like it
        ga, gb = self.groups[a], self.groups[b]
        if ga.parts and gb.parts and self.layout(ga) != self.layout(gb):
            ga.barriers.append("two channel Concats of different layouts are coupled")
        self.parent[b] = a
        if ga.width != gb.width:
            ga.barriers.append(f"groups of widths {ga.width} and {gb.width} are coupled")
        if ga.unit_size is None:
            ga.unit_size = gb.unit_size
        elif gb.unit_size is not None and gb.unit_size != ga.unit_size:
            ga.barriers.append(f"coupled groups split into units of {ga.unit_size} and {gb.unit_size}")
        ga.has_head |= gb.has_head
        ga.hard |= gb.hard
        ga.natural |= gb.natural
        for name in ("sources", "consumers", "slices", "shape_edits", "nodes", "barriers",
                     "group_edits"):
            getattr(ga, name).extend(getattr(gb, name))
        return a

    def composite(self, parts: list[tuple[int, int]], width: int) -> int:
        """A new group made of ``parts`` (none: a plain group without a source)."""
        gid = len(self.groups)
        self.groups[gid] = Group(gid, width, unit_size=1, parts=parts)
        self.parent[gid] = gid
        return gid

    def resolve(self) -> None:
        """Hand what each composite recorded to its parts, offsetting channel positions, until
        none holds anything: a part may be a composite itself (a Concat of a Concat's output, a
        Split window split again), so this runs to a fixed point."""
        moved = True
        while moved:
            moved = False
            for gid in sorted(self.groups, reverse=True):
                c = self.groups[gid]
                if not c.parts or self.find(gid) != gid or not (
                        c.consumers or c.slices or c.sources or c.shape_edits or c.group_edits
                        or c.nodes or c.barriers):
                    continue
                moved = True
                for p, o in self.layout(c):
                    g = self.groups[p]
                    g.consumers += [replace(k, offset=k.offset + o, span=k.span or c.width)
                                    for k in c.consumers]
                    g.slices += [replace(k, offset=k.offset + o) for k in c.slices]
                    g.sources += c.sources
                    g.shape_edits += c.shape_edits
                    g.group_edits += c.group_edits
                    g.nodes += c.nodes
                    g.barriers += c.barriers
                    g.hard |= c.hard
                    g.natural |= c.natural
                for name in ("consumers", "slices", "sources", "shape_edits", "group_edits",
                             "nodes", "barriers"):
                    setattr(c, name, [])

    def parts_of(self, gid: int) -> list[tuple[int, int]]:
        """(group, width) of the plain groups that make up ``gid``'s axis (itself if plain)."""
        g = self.groups[self.find(gid)]
        if not g.parts:
            return [(g.id, g.width)]
        bounds = [o for _, o in g.parts] + [g.width]
        out = []
        for (p, _), lo, hi in zip(g.parts, bounds, bounds[1:]):
            inner = self.parts_of(p)
            out += inner if len(inner) > 1 else [(inner[0][0], hi - lo)]
        return out

    def mac_factors(self) -> dict[str, list[list[tuple[int, int]]]]:
        """Node -> the axes its MACs scale with, each as the (group, width) parts on that axis:
        every contracted channel axis of a consumer and every channel axis of its output, an axis
        counted once per side (a depthwise conv's channels, the head axis of the attention
        products, are one axis)."""
        out: dict[str, list[list[tuple[int, int]]]] = {}
        seen: set[tuple[str, str, tuple]] = set()
        for node, gid, side in self.mac_axes:
            parts = self.parts_of(gid)
            key = (node, side, tuple(parts))
            if key not in seen:
                seen.add(key)
                out.setdefault(node, []).append(parts)
        return out

    def group(self, gid: int) -> Group:
        return self.groups[self.find(gid)]

    # -- helpers ----------------------------------------------------------------------------
    def shape(self, v: ir.Value) -> tuple[int, ...] | None:
        arr = self.probe.get(v.name)
        if arr is None:
            arr = const_array(v)
        return None if arr is None else tuple(np.shape(arr))

    def static(self, v: ir.Value | None) -> np.ndarray | None:
        """The value of ``v`` when it is computed from constants alone (exporters build Pad's
        pads with a chain of ConstantOfShape/Concat/Slice), else None."""
        if v is None:
            return None
        arr = const_array(v)
        if arr is not None:
            return arr
        stack, seen = [v], set()
        while stack:
            u = stack.pop()
            if u.name in seen or const_array(u) is not None:
                continue
            seen.add(u.name)
            node = u.producer()
            if node is None:
                return None  # a graph input
            stack.extend(i for i in node.inputs if i is not None)
        return self.probe.get(v.name)

    def track(self, v: ir.Value | None) -> Track:
        return {} if v is None else self.tracks.get(v.name, {})

    def block(self, gid: int, reason: str, natural: bool = False) -> None:
        g = self.group(gid)
        g.barriers.append(reason)
        g.hard |= not natural
        g.natural |= natural

    def block_all(self, track: Track, reason: str, natural: bool = False) -> None:
        for gid, _ in track.values():
            self.block(gid, reason, natural)

    def new_group(self, node: ir.Node, out: ir.Value, axis: int, width: int) -> int:
        gid = len(self.groups)
        self.groups[gid] = Group(gid, width, sources=[node.name])
        self.parent[gid] = gid
        self.tracks.setdefault(out.name, {})[axis] = (gid, Role.FLAT)
        return gid

    def merge_axis(self, node: ir.Node, entries: list[tuple[int, ir.Value, int]],
                   out_axis: int, out: Track) -> None:
        """Join the operands that share one (broadcast) output axis.

        ``entries`` are (input slot, value, axis in that value). Tracked operands are merged into one
        group; constants of full size on a unit axis are sliced with it; a size-1 operand broadcasts;
        an untracked run-time tensor of full size is a barrier (e.g. the residual stream).
        """
        tracked = [(i, v, a, self.track(v)[a]) for i, v, a in entries if a in self.track(v)]
        if not tracked:
            return
        roles = {t[3][1] for t in tracked}
        gid = tracked[0][3][0]
        for t in tracked[1:]:
            gid = self.union(gid, t[3][0])
        if len(roles) > 1:
            self.block(gid, f"{node.op_type} '{node.name}' mixes {sorted(r.value for r in roles)} axes")
            return
        role = roles.pop()
        for i, v, a in entries:
            if a in self.track(v):
                continue
            dims = self.shape(v)
            if dims is None or dims[a] == 1:
                continue
            if const_array(v) is not None:
                if role is not Role.INNER:
                    self.group(gid).slices.append(ParamSlice(node.name, i, a, role))
            else:
                self.block(gid, f"{node.op_type} '{node.name}' combines the axis with run-time "
                                f"tensor '{v.name}' (a residual or another structure)", natural=True)
                return
        out[out_axis] = (self.find(gid), role)

    # -- the pass ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph:
            ins = [self.track(v) for v in node.inputs]
            if any(ins):
                handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
                for t in ins:
                    for gid, _ in t.values():
                        self.group(gid).nodes.append(node.name)
                folded = [(v, a) for v in node.inputs if v is not None
                          for a in self.track(v) if (v.name, a) in self.repeat]
                if handler is None:
                    for t in ins:
                        self.block_all(t, f"no handler for op {node.op_type} ('{node.name}')")
                elif folded and node.op_type not in _FOLDED_OK:
                    for v, a in folded:
                        self.block(self.track(v)[a][0], f"{node.op_type} '{node.name}' reads a "
                                                        f"flattened (channel, position) axis")
                else:
                    handler(self, node)
                    if folded and node.op_type in UNARY:
                        for a in self.track(node.outputs[0]):
                            r = self.repeat.get((node.inputs[0].name, a))
                            if r:
                                self.repeat[(node.outputs[0].name, a)] = r
                for v in node.outputs:
                    for gid, _ in self.track(v).values():
                        if node.name not in self.group(gid).nodes:
                            self.group(gid).nodes.append(node.name)
            self.maybe_source(node)
            if node.op_type in _HEAVY:
                for v in node.outputs:
                    for gid, role in self.track(v).values():
                        if role is not Role.INNER:
                            self.mac_axes.append((node.name, gid, "out"))
        for v in self.graph.outputs:
            self.block_all(self.track(v), f"reaches graph output '{v.name}'", natural=True)

    def maybe_source(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx"):
            return
        out = node.outputs[0] if node.outputs else None
        if out is None or out.name not in self.probe:
            return
        if node.op_type == "Conv":
            w = const_array(node.inputs[1])
            if w is None or attr(node, "group", 1) != 1 or self.track(out).get(1):
                return
            gid = self.new_group(node, out, 1, w.shape[0])
            g = self.group(gid)
            g.slices.append(ParamSlice(node.name, 1, 0, Role.FLAT))
            g.nodes.append(node.name)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if const_array(node.inputs[2]) is None:
                    g.barriers.append(f"Conv '{node.name}' has a run-time bias")
                g.slices.append(ParamSlice(node.name, 2, 0, Role.FLAT))
        elif node.op_type == "MatMul":
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 2 or self.track(out).get(self.probe[out.name].ndim - 1):
                return
            gid = self.new_group(node, out, self.probe[out.name].ndim - 1, w.shape[1])
            self.group(gid).slices.append(ParamSlice(node.name, 1, 1, Role.FLAT))
            self.group(gid).nodes.append(node.name)
        elif node.op_type == "Gemm":
            w = const_array(node.inputs[1])
            if w is None or self.track(out).get(1):
                return
            trans_b = attr(node, "transB", 0)
            gid = self.new_group(node, out, 1, w.shape[0] if trans_b else w.shape[1])
            g = self.group(gid)
            g.slices.append(ParamSlice(node.name, 1, 0 if trans_b else 1, Role.FLAT))
            g.nodes.append(node.name)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = const_array(node.inputs[2])
                if c is None:
                    g.barriers.append(f"Gemm '{node.name}' has a run-time bias")
                elif c.ndim >= 1 and c.shape[-1] == g.width and g.width > 1:
                    g.slices.append(ParamSlice(node.name, 2, c.ndim - 1, Role.FLAT))


# -- handlers: one per op type ------------------------------------------------------------------

def _elementwise(p: Propagator, node: ir.Node) -> None:
    out_v = node.outputs[0]
    out_shape = p.shape(out_v)
    if out_shape is None:
        return p.block_all(p.track(node.inputs[0]), f"no shape for '{out_v.name}'")
    r = len(out_shape)
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    if node.op_type in UNARY:
        data = data[:1]
        for v in node.inputs[1:]:
            p.block_all(p.track(v), f"{node.op_type} '{node.name}' takes the axis as a parameter")
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


def _transpose(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    perm = attr(node, "perm", None) or list(reversed(range(rank)))
    p.tracks[node.outputs[0].name] = {o: t[i] for o, i in enumerate(perm) if i in t}


def _prod(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def _reshape(p: Propagator, node: ir.Node) -> None:
    data, target = node.inputs[0], node.inputs[1]
    t = p.track(data)
    if p.track(target):
        return p.block_all(p.track(target), f"Reshape '{node.name}' shape depends on the axis")
    si, so = p.shape(data), p.shape(node.outputs[0])
    out: Track = {}
    folds: dict[int, int] = {}  # output axis -> positions folded into it after each channel
    merged_inner: set[int] = set()
    for a in sorted(t):
        gid, role = t[a]
        if a in merged_inner:
            continue
        pre, n = _prod(si[:a]), si[a]
        ks = [k for k in range(len(so)) if _prod(so[:k]) == pre]
        nxt = t.get(a + 1)
        if role is Role.HEAD and nxt is not None and nxt[1] is Role.INNER and \
                p.find(nxt[0]) == p.find(gid) and any(so[k] == n * si[a + 1] for k in ks):
            k = next(k for k in ks if so[k] == n * si[a + 1])
            out[k] = (gid, Role.FLAT)
            merged_inner.add(a + 1)
        elif any(so[k] == n for k in ks):
            out[next(k for k in ks if so[k] == n)] = (gid, role)
        elif role is Role.FLAT and _folds(si, so, a, t, ks) is not None:
            k, r = _folds(si, so, a, t, ks)
            out[k] = (gid, role)
            folds[k] = r
        elif role is Role.FLAT and any(k + 1 < len(so) and so[k] * so[k + 1] == n for k in ks):
            k = next(k for k in ks if k + 1 < len(so) and so[k] * so[k + 1] == n)
            g = p.group(gid)
            if g.unit_size is None:
                g.unit_size = so[k + 1]
            elif g.unit_size != so[k + 1]:
                g.barriers.append(f"Reshape '{node.name}' splits units of {so[k + 1]}, "
                                  f"elsewhere {g.unit_size}")
            g.has_head = True
            out[k], out[k + 1] = (gid, Role.HEAD), (gid, Role.INNER)
        else:
            return p.block(gid, f"Reshape '{node.name}' mixes the axis with others "
                                f"({list(si)} -> {list(so)})")
    allow_zero = attr(node, "allowzero", 0)
    for k, (gid, role) in out.items():
        if role is Role.INNER:
            continue
        elem = trace_element(target, k, p.probe)
        if isinstance(elem, ConstElement):
            if elem.value == -1:
                continue
            same = t.get(k)
            if elem.value == 0 and not allow_zero and same is not None and same[1] is role and \
                    p.find(same[0]) == p.find(gid):
                continue
            if elem.value == so[k]:
                p.group(gid).shape_edits.append(ShapeEdit(node.name, (1,) + elem.path, elem.offset,
                                                          role, folds.get(k, 1)))
                continue
        elif isinstance(elem, DimElement):
            src = p.tracks.get(elem.value, {}).get(elem.axis)
            if src is not None and p.find(src[0]) == p.find(gid) and src[1] is role:
                continue
        return p.block(gid, f"Reshape '{node.name}': cannot prove where element {k} of its "
                            f"target shape comes from")
    p.tracks[node.outputs[0].name] = out
    for k, r in folds.items():
        p.repeat[(node.outputs[0].name, k)] = r


def _folds(si, so, a: int, t: Track, ks: list[int]) -> tuple[int, int] | None:
    """(output axis, repeat) when input axis ``a`` and the untracked axes right after it become one
    output axis (``x.view(N, -1)`` of an NCHW map): channel c then owns ``repeat`` elements."""
    for k in ks:
        r, j = 1, a + 1
        while j < len(si) and j not in t and so[k] > si[a] * r:
            r *= si[j]
            j += 1
        if r > 1 and so[k] == si[a] * r:
            return k, r
    return None


def _matmul(p: Propagator, node: ir.Node) -> None:
    a_v, b_v = node.inputs[0], node.inputs[1]
    ta, tb = p.track(a_v), p.track(b_v)
    sa, sb, so = p.shape(a_v), p.shape(b_v), p.shape(node.outputs[0])
    ra, rb, ro = len(sa), len(sb), len(so)
    if ra < 2 or rb < 2:
        p.block_all(ta, f"MatMul '{node.name}' with a 1-D operand")
        return p.block_all(tb, f"MatMul '{node.name}' with a 1-D operand")
    out: Track = {}
    ka, kb = ta.get(ra - 1), tb.get(rb - 2)
    weight = const_array(b_v)
    folded = [a for a in ta if a != ra - 1 and (a_v.name, a) in p.repeat]
    if folded:
        return p.block(ta[folded[0]][0], f"MatMul '{node.name}' reads a flattened axis as rows")
    if ka is not None:
        gid, role = ka
        if weight is not None:
            if role is not Role.INNER:
                g = p.group(gid)
                r = p.repeat.get((a_v.name, ra - 1), 1)
                g.consumers.append(Consumer(node.name, 0, ra - 1, 1, rb - 2, role, r))
                p.mac_axes.append((node.name, gid, "in"))
                g.slices.append(ParamSlice(node.name, 1, rb - 2, role, r))
        elif kb is not None and kb[1] is Role.INNER and role is Role.INNER:
            p.union(gid, kb[0])  # Q.K^T: a contraction inside each head couples Q and K
        else:
            return p.block(gid, f"MatMul '{node.name}' contracts the axis with a run-time tensor")
    elif kb is not None:
        return p.block(kb[0], f"MatMul '{node.name}' contracts the axis with a run-time tensor")
    if ra - 2 in ta:
        out[ro - 2] = ta[ra - 2]
    if rb - 1 in tb:
        out[ro - 1] = tb[rb - 1]
    for o in range(ro - 2):
        entries = [(0, a_v, o - (ro - ra))] if o - (ro - ra) >= 0 else []
        if o - (ro - rb) >= 0:
            entries.append((1, b_v, o - (ro - rb)))
        p.merge_axis(node, entries, o, out)
    if out:
        p.tracks[node.outputs[0].name] = out


def _gemm(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"Gemm '{node.name}' takes the axis as a weight or bias")
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    k_axis = 0 if trans_a else 1
    weight = const_array(node.inputs[1])
    for axis, (gid, role) in t.items():
        if axis != k_axis or weight is None or role is Role.INNER:
            p.block(gid, f"Gemm '{node.name}' uses the axis as rows or with a run-time weight")
            continue
        w_axis = 1 if trans_b else 0
        g = p.group(gid)
        r = p.repeat.get((node.inputs[0].name, axis), 1)
        g.consumers.append(Consumer(node.name, 0, k_axis, 1, w_axis, role, r))
        p.mac_axes.append((node.name, gid, "in"))
        g.slices.append(ParamSlice(node.name, 1, w_axis, role, r))


def _softmax(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    opset = p.graph.opset_imports.get("", 13)
    axis = attr(node, "axis", -1 if opset >= 13 else 1) % rank
    normalised = {axis} if opset >= 13 else set(range(axis, rank))
    for a, (gid, role) in t.items():
        if a in normalised and role is not Role.INNER:
            return p.block(gid, f"{node.op_type} '{node.name}' normalises over the axis")
    p.tracks[node.outputs[0].name] = dict(t)


def _layer_norm(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    axis = attr(node, "axis", -1) % rank
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"LayerNormalization '{node.name}' takes the axis as a parameter")
    for a, (gid, role) in t.items():
        if a >= axis and role is not Role.INNER:
            return p.block(gid, f"LayerNormalization '{node.name}' normalises over the axis",
                           natural=True)
    p.tracks[node.outputs[0].name] = dict(t)


def _shape(p: Propagator, node: ir.Node) -> None:
    """Shape of a pruned tensor is harmless where it is cut down to other axes at once
    (onnxsim writes ``Slice(Shape(x), 0, -1)`` to rebuild leading dims after a Gemm)."""
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    start = attr(node, "start", 0)
    start = start + rank if start < 0 else start
    dims = np.arange(rank)[slice(start, attr(node, "end", None))]
    for use in node.outputs[0].uses():
        user, picked = use.node, None
        args = [const_array(v) for v in user.inputs[1:]]
        if user.op_type == "Gather" and use.idx == 0 and args[0] is not None:
            picked = dims[np.reshape(args[0], -1)]
        elif user.op_type == "Slice" and use.idx == 0 and all(a is not None for a in args[:2]) \
                and (len(args) < 3 or args[2] is None or int(np.reshape(args[2], -1)[0]) == 0):
            step = int(np.reshape(args[3], -1)[0]) if len(args) > 3 and args[3] is not None else 1
            picked = dims[int(np.reshape(args[0], -1)[0]):int(np.reshape(args[1], -1)[0]):step]
        if picked is None or any(int(a) in t for a in picked):
            return p.block_all(t, f"Shape '{node.name}' of the pruned tensor is used by "
                                  f"{user.op_type} '{user.name}'")


def _unsqueeze(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    out_rank = len(p.shape(node.outputs[0]))
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes")
    inserted = sorted(int(a) % out_rank for a in np.reshape(axes, -1))
    kept = [o for o in range(out_rank) if o not in inserted]
    p.tracks[node.outputs[0].name] = {kept[a]: v for a, v in t.items()}


def _squeeze(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    in_shape = p.shape(node.inputs[0])
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "axes")
    removed = ({int(a) % len(in_shape) for a in np.reshape(axes, -1)} if axes is not None
               else {a for a, d in enumerate(in_shape) if d == 1})
    kept = [a for a in range(len(in_shape)) if a not in removed]
    p.tracks[node.outputs[0].name] = {kept.index(a): v for a, v in t.items() if a in kept}


def _spatial_only(p: Propagator, node: ir.Node, t: Track) -> bool:
    """Conv-like ops keep batch and channel axes (0, 1) and mix spatial ones: a tracked spatial
    axis is a barrier. True when the op may proceed."""
    bad = [gid for a, (gid, _) in t.items() if a >= 2]
    for gid in bad:
        p.block(gid, f"{node.op_type} '{node.name}' mixes the axis spatially")
    return not bad


def _conv(p: Propagator, node: ir.Node) -> None:
    """Group-1 Conv: a consumer of its input channels (weight axis 1). Depthwise Conv (one filter
    per channel): the output channel axis is the input's, and weight, bias and ``group`` shrink with
    it. Other grouped convs tie channels in blocks of C/group: a barrier."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"Conv '{node.name}' takes the axis as a weight or bias")
    if not _spatial_only(p, node, t) or 1 not in t:
        return
    gid, role = t[1]
    w = const_array(node.inputs[1])
    group = attr(node, "group", 1)
    if w is None:
        return p.block(gid, f"Conv '{node.name}' has a run-time weight")
    g = p.group(gid)
    if group == 1:
        g.consumers.append(Consumer(node.name, 0, 1, 1, 1, role,
                                    trailing=len(p.shape(node.inputs[0])) - 2))
        p.mac_axes.append((node.name, gid, "in"))
        g.slices.append(ParamSlice(node.name, 1, 1, role))
        return
    channels = p.shape(node.inputs[0])[1]
    if group != channels or w.shape[0] != channels or w.shape[1] != 1:
        return p.block(gid, f"grouped Conv '{node.name}' (group={group}, {channels} channels in, "
                            f"{w.shape[0]} out) ties channels in blocks")
    g.slices.append(ParamSlice(node.name, 1, 0, role))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if const_array(node.inputs[2]) is None:
            return p.block(gid, f"Conv '{node.name}' has a run-time bias")
        g.slices.append(ParamSlice(node.name, 2, 0, role))
    g.group_edits.append(node.name)
    p.tracks[node.outputs[0].name] = {1: (gid, role)}


def _batch_norm(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"BatchNormalization '{node.name}' takes the axis as a parameter")
    if len([o for o in node.outputs if o is not None and o.uses()]) > 1:
        return p.block_all(t, f"BatchNormalization '{node.name}' in training mode")
    if not _spatial_only(p, node, t) or 1 not in t:
        return
    gid, role = t[1]
    for i in range(1, 5):
        if const_array(node.inputs[i]) is None:
            return p.block(gid, f"BatchNormalization '{node.name}' has run-time statistics")
        p.group(gid).slices.append(ParamSlice(node.name, i, 0, role))
    p.tracks[node.outputs[0].name] = dict(t)


def _pool(p: Propagator, node: ir.Node) -> None:
    """Pooling works per channel; MaxPool's optional indices output encodes channel positions."""
    t = p.track(node.inputs[0])
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return p.block_all(t, f"{node.op_type} '{node.name}' returns indices")
    if _spatial_only(p, node, t):
        p.tracks[node.outputs[0].name] = dict(t)


def _pad(p: Propagator, node: ir.Node) -> None:
    """Padding of other axes keeps the channel axis; padding the channel axis is a barrier."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"Pad '{node.name}' takes the axis as a parameter")
    rank = len(p.shape(node.inputs[0]))
    pads = p.static(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "pads", None)
    axes = p.static(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None \
        else None
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        return p.block_all(t, f"Pad '{node.name}' has run-time pads")
    pads = np.reshape(pads, -1)
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.reshape(axes, -1)]
    padded = {a for i, a in enumerate(axes) if pads[i] != 0 or pads[i + len(axes)] != 0}
    for a, (gid, _) in t.items():
        if a in padded:
            return p.block(gid, f"Pad '{node.name}' pads the axis")
    p.tracks[node.outputs[0].name] = dict(t)


def _reduce(p: Propagator, node: ir.Node) -> None:
    """A reduction over other axes (the squeeze-excite ``mean`` over H, W) keeps the axis."""
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"{node.op_type} '{node.name}' takes the axis as a parameter")
    axes = p.static(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        return p.block_all(t, f"{node.op_type} '{node.name}' has run-time axes")
    if axes is None or np.size(axes) == 0:
        reduced = set() if attr(node, "noop_with_empty_axes", 0) else set(range(rank))
    else:
        reduced = {int(a) % rank for a in np.reshape(axes, -1)}
    for a, (gid, _) in t.items():
        if a in reduced:
            return p.block(gid, f"{node.op_type} '{node.name}' reduces over the axis")
    keep = attr(node, "keepdims", 1)
    kept = [a for a in range(rank) if keep or a not in reduced]
    p.tracks[node.outputs[0].name] = {kept.index(a): v for a, v in t.items()}


def _concat(p: Propagator, node: ir.Node) -> None:
    """Concat along another axis keeps the channel axis, like a broadcasting op (a ViT's class
    token joins the patch tokens: a constant operand is sliced, a run-time one stops the group).
    Concat *along* the channel axes of several groups makes a composite axis: each group keeps
    its channels at an offset (see :meth:`Propagator.resolve`)."""
    rank = len(p.shape(node.outputs[0]))
    axis = attr(node, "axis", 0) % rank
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    out: Track = {}
    joined = [p.track(v).get(axis) for _, v in data]
    if any(joined):
        why = None
        if not all(joined):
            why = f"Concat '{node.name}' joins a channel group with an untracked tensor"
        elif any(r is not Role.FLAT or (v.name, axis) in p.repeat or p.group(g).unit_size not in
                 (None, 1) for (_, v), (g, r) in zip(data, joined)):
            why = f"Concat '{node.name}' joins groups of multi-channel units"
        if why:
            for j in joined:
                if j:
                    p.block(j[0], why)
            return
        parts, offset = [], 0
        for (_, v), (g, _) in zip(data, joined):
            parts.append((p.find(g), offset))
            offset += p.shape(v)[axis]
        out[axis] = (p.composite(parts, offset), Role.FLAT)
    for a in range(rank):
        if a != axis:
            p.merge_axis(node, [(i, v, a) for i, v in data], a, out)
    if out:
        p.tracks[node.outputs[0].name] = out


def _split(p: Propagator, node: ir.Node) -> None:
    """Split along another axis keeps the channel axis in every piece. Split *of* a channel axis
    cuts the group into windows: each output gets a group of its own, and the split group becomes
    a composite of those windows (what its producers and earlier readers recorded is handed to
    the windows at their offsets, as for a Concat); the window sizes are edited with the kept
    channels."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.block_all(p.track(v), f"Split '{node.name}' takes the axis as a parameter")
    axis = attr(node, "axis", 0) % len(p.shape(node.inputs[0]))
    if axis not in t:
        for out in node.outputs:
            if out is not None:
                p.tracks[out.name] = dict(t)
        return
    gid, role = t[axis]
    g = p.group(gid)
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else None
    why = None
    if sizes is None:
        why = "without a constant sizes input"
    elif role is not Role.FLAT or g.unit_size not in (None, 1) or \
            (node.inputs[0].name, axis) in p.repeat:
        why = "of multi-channel units"
    elif g.parts:
        why = "of a Concat's output"
    elif len(t) > 1:
        why = "of a tensor with other pruned axes"
    if why:
        return p.block(gid, f"Split '{node.name}' of a channel axis {why}")
    parts, offset = [], 0
    for i, (out, size) in enumerate(zip(node.outputs, np.reshape(sizes, -1))):
        w = p.composite([], int(size))  # a plain group with no source: the window
        p.groups[w].shape_edits.append(ShapeEdit(node.name, (1,), i, Role.FLAT))
        parts.append((w, offset))
        offset += int(size)
        if out is not None:
            p.tracks[out.name] = {axis: (w, Role.FLAT)}
    g.parts, g.unit_size = parts, 1


def _flatten(p: Propagator, node: ir.Node) -> None:
    """[N, C, H, W] -> [N, C*H*W] (axis 1): the channel axis survives with a repeat of H*W."""
    t = p.track(node.inputs[0])
    si = p.shape(node.inputs[0])
    k = attr(node, "axis", 1) % (len(si) or 1)
    out: Track = {}
    for a, (gid, role) in t.items():
        lead, rest = (si[:a], si[a + 1:k]) if a < k else (si[k:a], si[a + 1:])
        if _prod(lead) != 1 or role is not Role.FLAT and _prod(rest) != 1:
            return p.block(gid, f"Flatten '{node.name}' mixes the axis with others")
        o = 0 if a < k else 1
        out[o] = (gid, role)
        if _prod(rest) > 1:
            p.repeat[(node.outputs[0].name, o)] = _prod(rest)
    p.tracks[node.outputs[0].name] = out


HANDLERS: dict[str, Callable[[Propagator, ir.Node], None]] = {
    **{op: _elementwise for op in UNARY | BROADCAST},
    "Transpose": _transpose,
    "Reshape": _reshape,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "LayerNormalization": _layer_norm,
    "Shape": _shape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Pad": _pad,
    "Flatten": _flatten,
    "Concat": _concat,
    "Split": _split,
    **{op: _pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                            "GlobalMaxPool", "GlobalLpPool")},
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                              "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
}

#: Matrix products: the nodes whose MACs are counted (see :mod:`optin_onnx.flops`).
_HEAVY = {"MatMul", "Gemm", "Conv"}

#: Ops that may read a flattened (channel, position) axis: per-element ops and the classifier.
_FOLDED_OK = UNARY | {"Gemm", "MatMul"}


def propagate(model: ir.Model, probe: dict[str, np.ndarray]
              ) -> tuple[list[Group], dict[str, list[list[tuple[int, int]]]]]:
    """Run the pass; return the merged groups (roots of the union-find), in creation order, and
    the MAC factors of every matrix product (:meth:`Propagator.mac_factors`)."""
    prop = Propagator(model, probe)
    prop.run()
    prop.resolve()
    groups = [g for gid, g in prop.groups.items() if prop.find(gid) == gid and not g.parts]
    return groups, prop.mac_factors()
