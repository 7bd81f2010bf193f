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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    # True once something other than a natural end (residual add, normalisation over the axis, a
    # graph output) stopped the group: only then is a group without consumers worth reporting.
    hard: bool = False


class Propagator:
    """One forward pass that builds every group. Use :func:`propagate`."""

    def __init__(self, model: ir.Model, probe: dict[str, np.ndarray]):
        self.graph = model.graph
        self.probe = probe
        self.tracks: dict[str, Track] = {}
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}

    # -- union-find over groups -------------------------------------------------------------
    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        self.parent[b] = a
        if ga.width != gb.width:
            ga.barriers.append(f"groups of widths {ga.width} and {gb.width} are coupled")
        if ga.unit_size is None:
            ga.unit_size = gb.unit_size
        elif gb.unit_size is not None and gb.unit_size != ga.unit_size:
            ga.barriers.append(f"coupled groups split into units of {ga.unit_size} and {gb.unit_size}")
        ga.has_head |= gb.has_head
        ga.hard |= gb.hard
        for name in ("sources", "consumers", "slices", "shape_edits", "nodes", "barriers"):
            getattr(ga, name).extend(getattr(gb, name))
        return a

    def group(self, gid: int) -> Group:
        return self.groups[self.find(gid)]

    # -- helpers ----------------------------------------------------------------------------
    def shape(self, v: ir.Value) -> tuple[int, ...] | None:
        arr = self.probe.get(v.name)
        if arr is None:
            arr = const_array(v)
        return None if arr is None else tuple(np.shape(arr))

    def track(self, v: ir.Value | None) -> Track:
        return {} if v is None else self.tracks.get(v.name, {})

    def block(self, gid: int, reason: str, natural: bool = False) -> None:
        g = self.group(gid)
        g.barriers.append(reason)
        g.hard |= not natural

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
                if handler is None:
                    for t in ins:
                        self.block_all(t, f"no handler for op {node.op_type} ('{node.name}')")
                else:
                    handler(self, node)
                for v in node.outputs:
                    for gid, _ in self.track(v).values():
                        if node.name not in self.group(gid).nodes:
                            self.group(gid).nodes.append(node.name)
            self.maybe_source(node)
        for v in self.graph.outputs:
            self.block_all(self.track(v), f"reaches graph output '{v.name}'", natural=True)

    def maybe_source(self, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx"):
            return
        out = node.outputs[0] if node.outputs else None
        if out is None or out.name not in self.probe:
            return
        if node.op_type == "MatMul":
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
                                                          role))
                continue
        elif isinstance(elem, DimElement):
            src = p.tracks.get(elem.value, {}).get(elem.axis)
            if src is not None and p.find(src[0]) == p.find(gid) and src[1] is role:
                continue
        return p.block(gid, f"Reshape '{node.name}': cannot prove where element {k} of its "
                            f"target shape comes from")
    p.tracks[node.outputs[0].name] = out


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
    if ka is not None:
        gid, role = ka
        if weight is not None:
            if role is not Role.INNER:
                g = p.group(gid)
                g.consumers.append(Consumer(node.name, 0, ra - 1, 1, rb - 2, role))
                g.slices.append(ParamSlice(node.name, 1, rb - 2, role))
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
        g.consumers.append(Consumer(node.name, 0, k_axis, 1, w_axis, role))
        g.slices.append(ParamSlice(node.name, 1, w_axis, role))


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
}


def propagate(model: ir.Model, probe: dict[str, np.ndarray]) -> list[Group]:
    """Run the pass; return the merged groups (roots of the union-find), in creation order."""
    prop = Propagator(model, probe)
    prop.run()
    return [g for gid, g in prop.groups.items() if prop.find(gid) == gid]
