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

import hashlib

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.cache import reads_axis, source_input, through_copies
from optin_onnx.analysis.groups import Group, Groups, Track
from optin_onnx.analysis.handlers import FOLDED_OK, HANDLERS, HEAVY, LEAD_OK, SOURCES, UNARY
from optin_onnx.analysis.handlers.repeat import broadcast_along, tiled_constant
from optin_onnx.analysis.structure import ParamSlice, Port, Role
from optin_onnx.graph import attr, captured, const_array, const_root


class Propagator(Groups):
    """One forward pass that builds every group. Use :func:`propagate`."""

    def __init__(self, model: ir.Model, probe: dict[str, np.ndarray]):
        super().__init__()
        self.graph = model.graph
        self.probe = probe
        self.tracks: dict[str, Track] = {}
        # (value, axis) -> H*W where a Flatten folded positions into the channel axis
        self.repeat: dict[tuple[str, int], int] = {}
        # (value, axis) -> B where a Reshape folded a batch-like axis in front of the units
        # (``[B, H, S, D] -> [B*H, S, D]``): still the units' axis, element b*H + h
        self.lead: dict[tuple[str, int], int] = {}
        # (value, axis) -> sub-units per unit on that axis (grouped-query attention: the query
        # heads of one key/value head, see :meth:`Groups.regroup`); 1 where absent
        self.grouping: dict[tuple[str, int], int] = {}
        # Reshape / Expand / Tile -> (Shape node, groups) for each Shape read of a pruned axis
        # that sizes its target; ``proved``: the nodes whose every target element was proved
        # (see ``handlers.layout.shape``). What is read and never proved stops the groups.
        self.unproved: dict[str, list[tuple[str, set[int]]]] = {}
        self.proved: set[str] = set()

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

    def barrier(self, gid: int, reason: str, natural: bool = False) -> None:
        g = self.group(gid)
        g.barriers.append(reason)
        g.hard |= not natural
        g.natural |= natural

    def regroup(self, gid: int, factor: int) -> None:
        root = self.find(gid)
        super().regroup(root, factor)
        for name, track in self.tracks.items():
            for a, (g, role) in track.items():
                if role is not Role.INNER and self.find(g) == root:
                    self.grouping[(name, a)] = self.grouping.get((name, a), 1) * factor

    def group_of(self, v: ir.Value, axis: int) -> int:
        """Sub-units per unit on ``axis`` of ``v`` (1 unless grouped-query heads)."""
        return self.grouping.get((v.name, axis), 1)

    def keep_unless_on(self, node: ir.Node, axes: set[int], reason: str,
                       natural: bool = False) -> None:
        """Pass ``node``'s input tracks to its output, unless the op acts across one of ``axes``
        (normalises, slices) where a group has a unit axis: then that group stops there."""
        t = self.track(node.inputs[0])
        for a, (gid, role) in t.items():
            if a in axes and role is not Role.INNER:
                return self.barrier(gid, f"{node.op_type} '{node.name}' {reason}", natural)
        self.tracks[node.outputs[0].name] = dict(t)

    def barrier_all(self, track: Track, reason: str, natural: bool = False) -> None:
        for gid, _ in track.values():
            self.barrier(gid, reason, natural)

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
        groupings = [self.group_of(v, a) for _, v, a, _ in tracked]
        most = max(groupings)
        why = None
        if len(roles) > 1:
            why = f"mixes {sorted(r.value for r in roles)} axes"
        elif any(most % g for g in groupings):
            why = f"couples heads grouped {sorted(set(groupings))} at a time"
        else:
            for (_, v, a, (g, role)), grouping in zip(tracked, groupings):
                if grouping < most and role is not Role.INNER:
                    # Query heads meet a key/value axis that serves ``most // grouping`` of them.
                    self.regroup(g, most // grouping)
        gid = tracked[0][3][0]
        for t in tracked[1:]:
            gid = self.union(gid, t[3][0])
        if why is not None:  # every operand's group stops here, not only the first's
            return self.barrier(gid, f"{node.op_type} '{node.name}' {why}")
        role = roles.pop()
        lead = max(self.lead.get((v.name, a), 1) for _, v, a, _ in tracked)
        fits: set[int] = set()  # slots that fit the kept units as they are, or at the Tile
        for i, v, a in entries:
            if a in self.track(v):
                continue
            dims = self.shape(v)
            if dims is None or dims[a] == 1:
                continue
            if role is Role.INNER:
                continue  # never sliced: rotary cos/sin, or any operand, fits every head
            if broadcast_along(self, node, i, a, gid, role, lead, most):
                fits.add(i)  # a mask expanded to the heads read from this axis
            elif const_array(v) is not None:
                self.group(gid).slices.append(ParamSlice(node.name, i, a, role, group=most))
            elif role is Role.HEAD and lead > 1 and \
                    (src := tiled_constant(self, v, a, lead)) is not None:
                self.group(gid).slices.append(ParamSlice(*src, role, group=most))
                fits.add(i)
            elif role is Role.HEAD and (v.name, a) not in self.lead:
                # Per-head values computed at run time (a relative position bias shared by every
                # layer, ALiBi): each use keeps the heads its group keeps.
                self.group(gid).slices.append(ParamSlice(node.name, i, a, role, group=most,
                                                         runtime=True))
            else:
                self.barrier(gid, f"{node.op_type} '{node.name}' combines the axis with run-time "
                                  f"tensor '{v.name}' (a residual or another structure)",
                             natural=role is Role.FLAT)
                return
        if lead > 1 and any(
                a not in self.track(v) and (self.shape(v) or (1,) * (a + 1))[a] != 1
                and i not in fits for i, v, a in entries):
            return self.barrier(gid, f"{node.op_type} '{node.name}' combines a folded (batch x "
                                     f"units) axis with a full-size operand")
        out[out_axis] = (self.find(gid), role)
        if most > 1 and role is not Role.INNER:
            self.grouping[(node.outputs[0].name, out_axis)] = most

    # -- the pass ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph:
            # A subgraph (If branch, Loop body) reads outer values by name: inputs all the same.
            ins = [self.track(v) for v in (*node.inputs, *captured(node))]
            if any(ins):
                handler = HANDLERS.get((node.domain or "", node.op_type))
                for t in ins:
                    for gid, _ in t.values():
                        self.group(gid).nodes.append(node.name)
                folded = [(v, a) for v in node.inputs if v is not None
                          for a in self.track(v) if (v.name, a) in self.repeat]
                leads = [(v, a) for v in node.inputs if v is not None
                         for a in self.track(v) if (v.name, a) in self.lead]
                if handler is None:
                    for t in ins:
                        self.barrier_all(t, f"no handler for op {node.op_type} ('{node.name}')")
                elif folded and node.op_type not in FOLDED_OK:
                    for v, a in folded:
                        self.barrier(self.track(v)[a][0], f"{node.op_type} '{node.name}' reads a "
                                                        f"flattened (channel, position) axis")
                elif leads and node.op_type not in LEAD_OK:
                    for v, a in leads:
                        self.barrier(self.track(v)[a][0], f"{node.op_type} '{node.name}' reads a "
                                                        f"folded (batch x units) axis")
                else:
                    handler(self, node)
                    if node.op_type != "Reshape":
                        self.carry_factors(node)
                    if folded and node.op_type in UNARY:
                        for a in self.track(node.outputs[0]):
                            r = self.repeat.get((node.inputs[0].name, a))
                            if r:
                                self.repeat[(node.outputs[0].name, a)] = r
                for v in node.outputs:
                    for gid, _ in self.track(v).values():
                        if node.name not in self.group(gid).nodes:
                            self.group(gid).nodes.append(node.name)
            source = SOURCES.get((node.domain or "", node.op_type))
            out = node.outputs[0] if node.outputs else None
            if source is not None and out is not None and out.name in self.probe:
                source(self, node)
            if node.op_type in HEAVY:
                for v in node.outputs:
                    for gid, role in self.track(v).values():
                        if role is not Role.INNER:
                            self.mac_axes.append((node.name, gid, "out"))
        for v in self.graph.outputs:
            for a, (gid, role) in self.track(v).items():
                # The inner axis of a unit never changes size: harmless in an output.
                if role is not Role.INNER and not self.cache_port(v, a, gid, role):
                    self.barrier(gid, f"reaches graph output '{v.name}'", natural=True)
        for name, reads in self.unproved.items():
            if name not in self.proved:
                for shape, gids in reads:
                    for gid in gids:
                        self.barrier(gid, f"Shape '{shape}' of the pruned tensor sizes '{name}', "
                                          f"which nothing proves")

    def cache_port(self, out: ir.Value, axis: int, gid: int, role: Role) -> bool:
        """Let graph output ``out`` carry the group's ``axis`` when it is a KV cache: a Concat,
        along another axis, of a graph input (the past) with values of the group (the new keys or
        values), the past read nowhere else on that axis. Then the past and the present both
        shrink with the units kept (:class:`~optin_onnx.analysis.structure.Port`); the run-time
        slice the Concat recorded for the past operand is dropped, since the input itself holds
        the kept units only. Anything else reaching a graph output stays a barrier::

            past (graph input) --[Identity/Cast]--+
                                                  Concat(axis=past length) --> present (output)
            x --MatMul(Wk)--Reshape--Transpose----+            |
                                                               +--> MatMul(Q K^T) ...
        """
        cat = through_copies(out)
        if cat is None or cat.op_type != "Concat" or \
                self.group(gid).parts or len(cat.inputs) < 2:
            return False
        rank = len(self.shape(cat.outputs[0]) or ())
        if not rank or attr(cat, "axis", 0) % rank == axis:
            return False
        g = self.group(gid)
        pasts = []
        for i, v in enumerate(cat.inputs):
            if axis in self.track(v):
                if self.find(self.track(v)[axis][0]) != self.find(gid):
                    return False
                continue
            source = source_input(v)
            runtime = [s for s in g.slices
                       if s.runtime and (s.node, s.input_index, s.axis) == (cat.name, i, axis)]
            if source is None or not runtime or reads_axis(source, axis, rank, cat):
                return False
            pasts.append((source, runtime))
        if len(pasts) != 1:
            return False
        source, runtime = pasts[0]
        g.slices = [s for s in g.slices if s not in runtime]
        group = runtime[0].group
        g.ports += [Port(source.name, False, axis, role, group),
                    Port(out.name, True, axis, role, group)]
        return True

    def tie_shared_weights(self) -> None:
        """One group for every application of a shared weight. ALBERT runs one layer's weights
        in every layer (the TorchScript export reaches them through ``Identity`` nodes): the
        groups of those applications become one, pruned once, so the weights stay shared and
        the kept units are the same wherever they are applied. A group whose source or consumer
        weight holds the same values as another group's is joined with it (and a barrier of
        either stops both): the same stored tensor, or a copy of it (the dynamo exporter writes
        each application's own copy). Weights of one repeated value (all zeros) say nothing
        about sharing and tie nothing."""
        nodes = {n.name: n for n in self.graph}
        owner: dict[tuple[tuple, bytes], int] = {}
        digests: dict[int, bytes | None] = {}
        for gid in list(self.groups):
            g = self.groups[gid]
            if self.find(gid) != gid or g.parts:
                continue
            # A weight's output channels (source) and its input channels (consumer) are
            # different axes: one projection ends one group and starts the next. A weight that
            # writes or reads several groups (either side of a channel Concat) does so at its
            # own channel offset for each: the window is part of the key.
            uses = [(("source", tuple(sorted({x.offset for x in g.slices
                                              if (x.node, x.input_index) == (s, 1)}))), s, 1)
                    for s in g.sources] + \
                [(("consumer", c.weight_axis, c.offset, c.span), c.node, c.weight_index)
                 for c in g.consumers]
            for side, name, slot in uses:
                node = nodes.get(name)
                root = None if node is None or len(node.inputs) <= slot else \
                    const_root(node.inputs[slot])
                if root is None:
                    continue
                if id(root) not in digests:
                    digests[id(root)] = _digest(const_array(root))
                if digests[id(root)] is None:
                    continue
                key = (side, digests[id(root)])
                if key in owner:
                    self.union(owner[key], gid)
                else:
                    owner[key] = gid

    def carry_factors(self, node: ir.Node) -> None:
        """Folds and groupings stay with an axis through ops that keep axes (transposes,
        element-wise ops, the batch axes of a MatMul): each output axis takes those of the input
        axes of its group; inputs folded differently on one axis are a barrier."""
        for out in node.outputs:
            if out is None:
                continue
            for o, (gid, role) in self.track(out).items():
                same = [(v.name, a) for v in node.inputs if v is not None
                        for a, (g, r) in self.track(v).items()
                        if self.find(g) == self.find(gid) and r is role]
                leads = {self.lead.get(k, 1) for k in same}
                if len(leads) > 1:
                    self.barrier(gid, f"{node.op_type} '{node.name}' combines folded and unfolded "
                                      f"(batch x units) axes")
                elif leads and max(leads) > 1:
                    self.lead[(out.name, o)] = max(leads)
                grouping = max((self.grouping.get(k, 1) for k in same), default=1)
                if grouping > 1 and role is not Role.INNER:
                    self.grouping.setdefault((out.name, o), grouping)


def propagated(model: ir.Model, probe: dict[str, np.ndarray]) -> Propagator:
    """The pass run to its end: every group built, composites resolved, shared weights tied."""
    prop = Propagator(model, probe)
    prop.run()
    prop.resolve()
    prop.tie_shared_weights()
    return prop


def propagate(model: ir.Model, probe: dict[str, np.ndarray]
              ) -> tuple[list[Group], dict[str, list[list[tuple[int, int]]]]]:
    """Run the pass; return the merged groups (roots of the union-find), in creation order, and
    the MAC factors of every matrix product (:meth:`Propagator.mac_factors`)."""
    prop = propagated(model, probe)
    groups = [g for gid, g in prop.groups.items() if prop.find(gid) == gid and not g.parts]
    return groups, prop.mac_factors()


def _digest(arr: np.ndarray | None) -> bytes | None:
    """A fingerprint of a weight's values (dtype, shape, bytes); None for a weight of one
    repeated value."""
    if arr is None or arr.size < 2 or np.all(arr.reshape(-1)[0] == arr):
        return None
    h = hashlib.blake2b(f"{arr.dtype.str}{arr.shape}".encode(), digest_size=20)
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.digest()

