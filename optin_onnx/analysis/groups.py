"""Axis groups: the union-find behind the propagation (see :mod:`optin_onnx.analysis.propagate`).

A *group* is one channel axis that can shrink, with everything recorded along the way (sources,
consumers, constants to slice, shape constants to edit). Ops that couple two axes merge their
groups; a channel ``Concat`` makes a *composite* group whose parts are other groups at channel
offsets. The same structure answers, at the end, which groups a matrix product's MACs scale with.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from optin_onnx.analysis.structure import AttrEdit, Consumer, ParamSlice, Port, Role, ShapeEdit

Track = dict[int, tuple[int, Role]]  # axis -> (group id, role)

@dataclass
class Group:
    id: int
    width: int
    unit_size: int | None = None
    # Sub-units per unit on the group's own (FLAT) width: the query heads that share one key/value
    # head in grouped-query attention (see :meth:`Groups.regroup`); units = width / (unit_size *
    # grouping).
    grouping: int = 1
    has_head: bool = False
    sources: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    attr_edits: list[AttrEdit] = field(default_factory=list)  # attributes counting the units
    ports: list[Port] = field(default_factory=list)  # graph inputs/outputs on the axis (KV cache)
    # A composite: the output axis of a channel Concat, made of these (group, channel offset)
    # parts. What is recorded on it is handed to the parts, with offsets, at the end of the pass.
    parts: list[tuple[int, int]] = field(default_factory=list)
    # True once something other than a natural end (residual add, normalisation over the axis, a
    # graph output) stopped the group; ``natural`` once such an end did. A group without consumers
    # is worth reporting only when it is hard and not natural: a natural end marks the model
    # width (a transformer's residual stream), which is never a block whatever else stops it.
    hard: bool = False
    natural: bool = False

    def stop(self, reason: str) -> None:
        """A barrier that is not the model width's natural end."""
        self.barriers.append(reason)
        self.hard = True



class Groups:
    """Union-find over :class:`Group`, with composites (channel Concat / Split windows) and the
    matrix-product nodes whose MACs scale with a group (``mac_axes``)."""

    def __init__(self) -> None:
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
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
            ga.stop("two channel Concats of different layouts are coupled")
        self.parent[b] = a
        if ga.width // ga.grouping != gb.width // gb.grouping:
            ga.stop(f"groups of widths {ga.width} and {gb.width} are coupled")
        if ga.unit_size is None:
            ga.unit_size = gb.unit_size
        elif gb.unit_size is not None and gb.unit_size != ga.unit_size:
            ga.stop(f"coupled groups split into units of {ga.unit_size} and {gb.unit_size}")
        ga.has_head |= gb.has_head
        ga.hard |= gb.hard
        ga.natural |= gb.natural
        for name in ("sources", "consumers", "slices", "shape_edits", "nodes", "barriers",
                     "attr_edits", "ports"):
            getattr(ga, name).extend(getattr(gb, name))
        return a

    def regroup(self, gid: int, factor: int) -> None:
        """Make every unit of ``gid`` a bundle of ``factor`` of its current units: its query heads
        met a key/value head axis that serves ``factor`` of them (grouped-query attention). What
        the group recorded so far is re-stamped; :class:`Propagator` re-stamps its tracks."""
        g = self.groups[self.find(gid)]
        g.grouping *= factor
        for name in ("consumers", "slices", "shape_edits", "attr_edits", "ports"):
            setattr(g, name, [r if r.role is Role.INNER else replace(r, group=r.group * factor)
                              for r in getattr(g, name)])

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
                        c.consumers or c.slices or c.sources or c.shape_edits or c.attr_edits
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
                    g.attr_edits += c.attr_edits
                    g.nodes += c.nodes
                    g.barriers += c.barriers
                    g.hard |= c.hard
                    g.natural |= c.natural
                for name in ("consumers", "slices", "sources", "shape_edits", "attr_edits",
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

