"""Block outputs of a CNN: where its trajectory loss is measured (feature kind ``blocks``).

A CNN has no layer index to order features by, so its trajectory is found by a liveness analysis
of the masked model: a value is a block output when, right after it is computed, it is the only
run-time float value the rest of the network still needs (between residual blocks, between plain
conv layers, the pooled feature before the classifier). Everything computed so far flows through
it, so it plays the part of a transformer layer's output.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from optin_onnx.analysis import Block, Consumer, Structure
from optin_onnx.instrument import mask_input_name


@dataclass(frozen=True)
class Point:
    """A block output in the masked model: value ``name`` (its channels on ``axis``), produced by
    the mask Mul at position ``order``."""

    order: int
    name: str
    axis: int


def block_points(masked: onnx.ModelProto, structure: Structure,
                 dtypes: Mapping[str, np.dtype]) -> tuple[list[Point], dict[str, int]]:
    """The block outputs of a CNN (see the module doc) and, per block, the position of its first
    mask. A value is a block output when, right after it is computed, it is the only run-time
    float value still needed (constants, masks and shape arithmetic do not count)."""
    g = masked.graph
    masks = {mask_input_name(b) for b in structure.blocks}
    static = {t.name for t in g.initializer} | masks
    last = {v: i for i, n in enumerate(g.node) for v in n.input}
    last.update({o.name: len(g.node) for o in g.output})
    consumers: dict[str, list[tuple[Block, Consumer]]] = {}
    for b in structure.blocks:
        for c in b.consumers:
            consumers.setdefault(f"{c.node}__optin_mask", []).append((b, c))
    first_mask: dict[str, int] = {}
    # value -> (its masked name, channel axis, position of the Mul that masks it first)
    masked_by: dict[str, tuple[str, int, int]] = {}
    for i, n in enumerate(g.node):
        for b, c in consumers.get(n.name, []):
            first_mask.setdefault(b.name, i)
            masked_by.setdefault(n.input[0], (n.output[0], c.data_axis, i))
    live = {v.name for v in g.input if v.name not in masks and
            np.issubdtype(dtypes[v.name], np.floating)}
    points = []
    for i, n in enumerate(g.node):
        if all(not v or v in static for v in n.input):
            static.update(n.output)
            continue
        live -= {v for v in n.input if last.get(v) == i}
        for o in n.output:
            if o and o not in static and last.get(o, -1) > i and \
                    np.issubdtype(dtypes[o], np.floating):
                live.add(o)
        if len(live) == 1 and next(iter(live)) in n.output and next(iter(live)) in masked_by:
            # ordered where it is masked: a block's own masked output is on its trajectory
            name, axis, at = masked_by[next(iter(live))]
            points.append(Point(at, name, axis))
    return points, first_mask

