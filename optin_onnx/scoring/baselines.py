"""Baseline importance scores that share OPTIN's search and rewrite (for the accuracy benchmark).

Both return the same :class:`~optin_onnx.scoring.types.Scores` (one importance array per
block, higher = keep), so :func:`~optin_onnx.search.search` uses them unchanged.

- :func:`score_magnitude`: data-free weight magnitude. A unit's score is the squared L2 norm of
  every parameter element that is sliced away with it, i.e. of everything in ``block.slices`` at
  the unit's positions: for a head, its columns of the Q, K and V weights and its entries of their
  biases plus its rows of the output projection W_O; for a neuron, its column of W1, its entry of
  b1 and its row of W2. A tensor reached by several slices (a shared initializer) counts once.
  Squared, not the plain norm, because the search adds scores up: a kept set's total is then the
  squared Frobenius norm of the parameters it keeps, so the search keeps the most weight energy
  the FLOPs budget allows, and heads (about 4 x hidden x head_dim elements) and neurons
  (2 x hidden + 1) are compared on the same footing. (Within a block the order is the L2 norm's.)
  A unit whose parameters are all zero scores exactly 0. For a conv channel: its filter in
  every producing conv (+ bias), its BN scale and shift, its input slice of every consuming conv
  or classifier; BN running statistics are not weights and do not count.
- :func:`score_random`: uniform random importances in [0, 1), seeded (the floor every criterion
  should beat).
"""
from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Structure
from optin_onnx.analysis.structure import Role
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.scoring.types import Scores


def _unit_sum_squares(block: Block, nodes: dict[str, ir.Node]) -> np.ndarray:
    """Per unit: the sum of squares of the parameter elements sliced away with it."""
    total = np.zeros(block.n_units, dtype=np.float64)
    seen: set[int] = set()
    for s in block.slices:
        value = nodes[s.node].inputs[s.input_index]
        if value is None or id(value) in seen or s.runtime:
            continue
        seen.add(id(value))
        arr = const_array(value)
        if arr is None:
            raise OptinError(f"{block.name}: the sliced input {s.input_index} of '{s.node}' is not "
                             f"a constant")
        if not np.issubdtype(arr.dtype, np.floating) or s.role is Role.INNER or \
                (nodes[s.node].op_type == "BatchNormalization" and s.input_index >= 3):
            continue  # INNER axes are never sliced; BN running statistics are not weights
        sq = np.moveaxis(np.asarray(arr, dtype=np.float64) ** 2, s.axis, 0)
        width = block.width(s.role, s.repeat, s.group)
        start = s.offset * s.repeat  # after a channel Concat the block owns a part of the axis
        per_index = sq.reshape(sq.shape[0], -1).sum(axis=1)[start:start + width]
        if per_index.size != width:
            raise OptinError(f"{block.name}: slice of '{s.node}' has {per_index.size} elements, "
                             f"expected {width}")
        total += per_index.reshape(block.n_units, -1).sum(axis=1)
    return total


def score_magnitude(model: ir.Model, structure: Structure) -> Scores:
    """Weight-magnitude importance of every unit (see the module doc for the exact definition)."""
    t0 = time.perf_counter()
    nodes = nodes_by_name(model.graph)
    importance = {b.name: _unit_sum_squares(b, nodes) for b in structure.blocks}
    return Scores(importance=importance, seconds=time.perf_counter() - t0)


def score_random(structure: Structure, seed: int = 0) -> Scores:
    """Uniform random importances in [0, 1), one per unit; the same ``seed`` gives the same scores."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    importance = {b.name: rng.random(b.n_units) for b in structure.blocks}
    return Scores(importance=importance, seconds=time.perf_counter() - t0)


__all__ = ["score_magnitude", "score_random"]
