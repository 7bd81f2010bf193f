"""Typed results of the analysis: prunable blocks and the exact edits that slim them.

Everything refers to nodes by name and to an input slot of that node (a *use*), never to a tensor
alone: a tensor shared by several nodes is sliced per use, which is what unsharing means.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class Role(str, Enum):
    """How a tensor axis indexes a block's units.

    Every record below (a slice, a consumer, a shape or attribute edit) also has a ``group``: the
    sub-units per unit on its axis. Grouped-query attention makes a unit one key/value head with
    the ``group`` query heads that read it: on the query side a unit spans ``group`` heads.

    FLAT:  channel c = unit * unit_size + offset (a projection's output width, e.g. H*D, the FFN
           width, a conv's output channels); slicing keeps whole runs of ``unit_size`` channels.
    HEAD:  the axis indexes units directly (the head axis after the Reshape that splits heads).
    INNER: the within-unit axis (head_dim); never sliced.
    """

    FLAT = "flat"
    HEAD = "head"
    INNER = "inner"


@dataclass(frozen=True)
class ParamSlice:
    """Slice the constant feeding ``node.inputs[input_index]`` along ``axis`` (or, ``runtime``,
    gather the kept positions of the run-time value there).

    ``repeat`` > 1: the axis is a flattened (channel, position) axis (``Flatten`` of an NCHW map
    before a classifier), element ``c * repeat + r`` belongs to channel ``c``. ``offset``: the
    block's channels start there (after a channel ``Concat``, other blocks own the rest)."""

    node: str
    input_index: int
    axis: int
    role: Role
    repeat: int = 1
    offset: int = 0
    group: int = 1
    # A run-time operand on a head axis (a position bias [B, H, S, S] computed once and added in
    # every layer): the rewrite gathers the kept heads at this use instead of slicing a constant.
    runtime: bool = False


@dataclass(frozen=True)
class ShapeEdit:
    """A constant element that holds the block's width (role FLAT: units * unit_size) or unit count
    (role HEAD); rewrite it to the kept size.

    The constant is found from ``node`` by following input slots ``path`` (e.g. Reshape slot 1, then
    Concat slot 3); every node on the way that is shared with other uses is cloned first.
    """

    node: str
    path: tuple[int, ...]
    offset: int  # of the element in the constant
    role: Role
    repeat: int = 1
    group: int = 1


@dataclass(frozen=True)
class AttrEdit:
    """An integer attribute of ``node`` that counts the block's units (role HEAD: a fused attention
    op's ``num_heads``) or channels (role FLAT: a depthwise conv's ``group``); it shrinks by what
    the block drops. ``index``: the element of an ints attribute (``qkv_hidden_sizes``), or -1 for
    a scalar attribute."""

    node: str
    name: str
    role: Role
    index: int = -1
    group: int = 1


@dataclass(frozen=True)
class Port:
    """A graph input or output whose ``axis`` is the block's axis: a decoder's KV cache, the past
    keys/values read in and the present ones (past joined with the new) written out. The model's
    interface changes with the prune: that axis holds the kept units only, so a serving stack must
    allocate the cache at the new size (the report lists every change)."""

    name: str
    output: bool
    axis: int
    role: Role
    group: int = 1


@dataclass(frozen=True)
class Consumer:
    """A node that contracts the block's channels against a constant weight: the end of the block.

    The mask point of the block is this node's data input (``data_index``), whose ``data_axis``
    indexes channels with ``role``; the weight's rows along ``weight_axis`` match those channels
    (each channel ``repeat`` times in a row, after a ``Flatten`` of a feature map). ``trailing``
    axes follow ``data_axis`` (a Conv's spatial axes): a mask broadcast on the data needs them.
    ``offset``: where the block's channels start on that axis (after a channel ``Concat``), and
    ``span`` the axis' channel count there (0: the block's own width).
    """

    node: str
    data_index: int
    data_axis: int
    weight_index: int
    weight_axis: int
    role: Role
    repeat: int = 1
    trailing: int = 0
    offset: int = 0
    span: int = 0
    group: int = 1


@dataclass(frozen=True)
class Removal:
    """How to remove an emptied block: the consumer's contribution reaches a residual ``Add``
    (``node``) through bias adds, constant scales (a layer scale) and reshapes only; input
    ``input_index`` of that Add is replaced by what an all-zero consumer output becomes on the way
    (see :meth:`constant`) or, when that is nothing (no bias), the Add is bypassed.

    ``bias_uses`` are the constants added on the way, in path order; ``scale_uses`` the constants
    that multiply it, each as (node, slot, n): applied after the first ``n`` biases (``inverse``:
    a ``Div``, the constant divides)."""

    node: str
    input_index: int
    bias_uses: tuple[tuple[str, int], ...]
    scale_uses: tuple[tuple[str, int, int, bool], ...] = ()

    def constant(self, lookup):
        """The replaced operand: ``lookup(node, slot)`` gives a constant; None where no bias."""
        value = None
        steps = sorted([(n, 1, (node, slot, inv)) for node, slot, n, inv in self.scale_uses] +
                       [(i + 1, 0, use) for i, use in enumerate(self.bias_uses)],
                       key=lambda t: (t[0], t[1]))
        for _, is_scale, use in steps:
            c = np.asarray(lookup(use[0], use[1]))
            if not is_scale:
                value = c if value is None else value + c
            elif value is not None:
                value = value / c if use[2] else value * c
        return value


@dataclass
class Block:
    """One prunable structure: an attention block (heads), an MLP/FFN block (neurons) or a group
    of coupled conv channels (every conv writing a residual stream, the depthwise convs and
    squeeze-excite gates on the way, ...)."""

    name: str
    kind: str  # "attention" | "mlp" | "channels"
    n_units: int
    unit_size: int
    sources: list[str]
    consumers: list[Consumer]
    slices: list[ParamSlice]
    shape_edits: list[ShapeEdit]
    nodes: list[str]  # every node whose input or output carries the block's axis
    removal: "Removal | None" = None  # how to drop the whole block, when that is provably exact
    feature: str = ""  # value whose change the trajectory loss measures (consumer output + bias)
    layer: int = -1
    # Attributes that count the block's units or channels (a depthwise conv's ``group``, a fused
    # attention op's ``num_heads``): they shrink with the block.
    attr_edits: list[AttrEdit] = field(default_factory=list)
    # Graph inputs and outputs that carry the block's axis (a KV cache): they shrink with it.
    ports: list[Port] = field(default_factory=list)

    @property
    def unit_name(self) -> str:
        return {"attention": "heads", "mlp": "neurons"}.get(self.kind, "channels")

    def channels(self, units, group: int = 1) -> list[int]:
        """Channel indices on a FLAT axis for the given unit indices (``group`` sub-units each)."""
        size = self.unit_size * group
        return [u * size + k for u in units for k in range(size)]

    def indices(self, units, role: Role, repeat: int = 1, offset: int = 0,
                group: int = 1) -> np.ndarray:
        """Element indices of ``units`` on an axis with ``role``, each unit ``group`` sub-units,
        each channel ``repeat`` times, the block's channels starting at channel ``offset``."""
        subs = [u * group + j for u in units for j in range(group)]
        base = np.asarray(self.channels(units, group) if role is Role.FLAT else subs, np.int64)
        return ((base[:, None] + offset) * repeat + np.arange(repeat)).reshape(-1)

    def width(self, role: Role, repeat: int = 1, group: int = 1) -> int:
        """Size of an axis with ``role`` when every unit is kept."""
        return self.n_units * (self.unit_size if role is Role.FLAT else 1) * group * repeat


@dataclass
class Declined:
    """A structure that looked prunable (it ends in a weight contraction) but is left alone; or,
    in ``Structure.model_width``, a projection whose channels end where the model width does (a
    residual add, a normalisation over the width, a graph output): not a prunable unit axis, and
    listed so that no group is dropped without its reason."""

    name: str
    reasons: list[str]


#: One axis a matrix product's MACs scale with: the blocks on it (several after a channel Concat,
#: their kept units adding up) and the channels on it that belong to no block.
Factor = tuple[tuple[str, ...], int]


@dataclass
class Structure:
    blocks: list[Block] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    model_width: list[Declined] = field(default_factory=list)
    n_layers: int = 0
    # node -> the factors its MACs scale with (a conv between two groups: two; see flops.py)
    mac_factors: dict[str, list[Factor]] = field(default_factory=dict)

    def interface(self, keep: Mapping[str, Sequence[int]]) -> dict[str, PortChange]:
        """Graph input or output name -> how a prune keeping ``keep`` changes it (see
        :class:`Port`); empty unless the model carries a pruned axis across its interface."""
        out = {}
        for b in self.blocks:
            units = sorted(keep.get(b.name, range(b.n_units)))
            for p in b.ports:
                out[p.name] = PortChange(p.name, p.output, p.axis, b.width(p.role, group=p.group),
                                         b.indices(units, p.role, group=p.group))
        return out


@dataclass(frozen=True)
class PortChange:
    """One graph input or output after a prune: ``axis`` had ``before`` elements and keeps
    ``kept`` (dense positions, ascending)."""

    name: str
    output: bool
    axis: int
    before: int
    kept: np.ndarray

    def take(self, array: np.ndarray) -> np.ndarray:
        """The part of a dense-model ``array`` for this port that the pruned model reads or
        writes."""
        return np.take(array, self.kept, axis=self.axis)

    def describe(self) -> str:
        kind = "output" if self.output else "input"
        return f"{kind} '{self.name}' axis {self.axis}: {self.before} -> {len(self.kept)}"


def pruned_feeds(feeds: Mapping[str, np.ndarray], changes: Mapping[str, PortChange]
                 ) -> dict[str, np.ndarray]:
    """The pruned model's inputs for the dense model's ``feeds``: a KV cache keeps the kept
    units' part of the dense one (what the pruned model would have written there itself)."""
    return {k: changes[k].take(a) if k in changes and not changes[k].output else a
            for k, a in feeds.items()}
