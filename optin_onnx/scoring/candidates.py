"""Candidate sets: which units are masked together, and how a set's score becomes per-unit scores.

Exact scoring masks one unit per candidate. Neuron groups (``neuron_group > 1``) are the one
approximation on offer: a layer's neurons (or a conv group's channels) are ordered by a cheap
local proxy (the size of their rank-1 contribution, ||a_k|| * ||W2[k]||: :func:`channel_proxy`),
cut into groups of that many adjacent neurons, and each group is masked as one candidate; its
score is shared among its neurons in proportion to the proxy (:func:`spread`). Every scorer
builds its candidates here, so all of them support groups identically.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block
from optin_onnx.graph import const_array
from optin_onnx.scoring.types import Captured


def candidate_sets(block: Block, group: int, proxy: np.ndarray | None,
                   only: Sequence[int] | None = None,
                   alive: Sequence[int] | None = None) -> list[np.ndarray]:
    """The unit sets scored for ``block``: singletons, or for MLP blocks with ``group > 1``,
    runs of ``group`` neurons adjacent in proxy order. ``only`` restricts exact scoring to some
    units (benchmarks compare scorers on a subset; the rest score NaN). ``alive``: the units not
    yet pruned (iterative pruning); the others are no candidates and score NaN."""
    units = np.arange(block.n_units) if alive is None else np.asarray(sorted(alive), dtype=int)
    if block.kind == "attention" or group <= 1:
        picked = units if only is None else [u for u in only if u in set(units.tolist())]
        return [np.array([u]) for u in picked]
    order = units[np.argsort(-proxy[units], kind="stable")]
    return [order[i:i + group] for i in range(0, len(order), group)]


def spread(scores: np.ndarray, sets: list[np.ndarray], proxy: np.ndarray | None,
           n_units: int) -> np.ndarray:
    """Per-unit values from per-set values (a set's value shared in proportion to the proxy).
    ``scores`` is [sets] or [sets, terms] (one L_KD per objective output); the result is
    [n_units] or [n_units, terms]."""
    out = np.full((n_units, *scores.shape[1:]), np.nan)
    for value, units in zip(scores, sets):
        if len(units) == 1 or proxy is None:
            out[units] = value / len(units)
        else:
            share = proxy[units] / max(proxy[units].sum(), 1e-30)
            out[units] = np.multiply.outer(share, value)
    return out


def channel_proxy(block: Block, nodes: dict[str, ir.Node], dense: Captured) -> np.ndarray:
    """||a_k|| * ||W[k]|| per unit, summed over the block's consumers: the size of unit k's
    contribution to their outputs (a conv's weight is [out, in, kh, kw]; a flattened map repeats
    each channel)."""
    return proxy_from_squares(block, nodes, input_squares(block, nodes, dense))


def input_squares(block: Block, nodes: dict[str, ir.Node], dense: Iterable[dict[str, np.ndarray]]
                  ) -> list[np.ndarray]:
    """Per consumer of ``block``, each input channel's squared activations summed over the chunks
    of ``dense``: sums add up over chunks, so a capture that keeps no chunk can still feed
    :func:`proxy_from_squares`."""
    out = []
    chunks = list(dense)
    for c in block.consumers:
        name = nodes[c.node].inputs[c.data_index].name
        x_sq = 0.0
        for values in chunks:
            x = values[name].astype(np.float64)
            x_sq = x_sq + np.moveaxis(x ** 2, c.data_axis, 0).reshape(x.shape[c.data_axis],
                                                                      -1).sum(1)
        out.append(np.asarray(x_sq))
    return out


def proxy_from_squares(block: Block, nodes: dict[str, ir.Node], squares: list[np.ndarray]
                       ) -> np.ndarray:
    """:func:`channel_proxy` from :func:`input_squares` (one array per consumer)."""
    total = np.zeros(block.n_units)
    for c, x_sq in zip(block.consumers, squares):
        w = const_array(nodes[c.node].inputs[c.weight_index]).astype(np.float64)
        w_sq = np.moveaxis(w ** 2, c.weight_axis, 0).reshape(w.shape[c.weight_axis], -1).sum(1)
        norm = np.sqrt(np.broadcast_to(x_sq, w_sq.shape)) * np.sqrt(w_sq)
        total += norm.reshape(block.n_units, -1).sum(1)
    return total

