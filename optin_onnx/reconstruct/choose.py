"""Which units a block keeps, given that the refit will make up for the ones it drops.

OPTIN's search decides how many units each block keeps; its scores then name them, each unit
judged with all others present. When the consumer is refitted afterwards, what matters is
instead how well the *kept* units can reproduce the consumer's dense output together: a unit
whose contribution the others can carry is cheap to drop even if its own effect is large. That is
the question Optimal Brain Surgeon answers for a least-squares layer (structured OBS: ZipLM,
SlimGPT, OSSCAR): with H = X^T X (X: the consumer's dense input over the scoring samples' real
tokens, damped) and W the consumer weight as [K, N], dropping rows g and refitting the others
costs

    tr(W_g^T (H^-1)_gg^-1 W_g)

and leaves W <- W - H^-1[:, g] (H^-1)_gg^-1 W_g, H^-1 <- H^-1 - H^-1[:, g] (H^-1)_gg^-1 H^-1[g, :]
for the next choice. Units are removed greedily, cheapest first, until the block holds the count
the search gave it, so the MACs and every width multiple stay exactly as searched.

Only blocks with one consumer that is a plain matrix product per position (MatMul, Gemm, 1x1
conv: :func:`~optin_onnx.reconstruct.scales.consumer_matrix`) are re-chosen; the others keep
the scores' choice. The Gram matrices are accumulated in float64 over calibration chunks, a pass
of the dense model per group of blocks whose matrices fit :data:`GRAM_BYTES`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Structure
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet
from optin_onnx.graph import nodes_by_name
from optin_onnx.reconstruct.scales import consumer_matrix
from optin_onnx.reconstruct.session import rows
from optin_onnx.scoring.suffix import prefix_runs

#: Damping of X^T X, relative to its mean diagonal (a unit silent on the calibration rows must
#: not make H singular).
DAMPING = 0.01
#: The Gram matrices one dense pass accumulates at most; more blocks take more passes.
GRAM_BYTES = 512 * 2 ** 20
#: Scalar units (neurons, channels) are removed in this many steps per block at most, each step
#: dropping the cheapest units together (one rank-m update instead of m rank-1 updates).
STEPS = 64


@dataclass
class Choice:
    """The selection with the re-chosen blocks, and for the report how many kept units changed
    (per re-chosen block) and which blocks kept the scores' choice and why."""

    keep: dict[str, list[int]]
    changed: dict[str, int]
    skipped: dict[str, str]

    def notes(self) -> list[str]:
        out = []
        if self.changed:
            moved = sum(self.changed.values())
            kept = sum(len(self.keep[b]) for b in self.changed)
            out.append(f"units within {len(self.changed)} blocks chosen for the refit (structured "
                       f"OBS on the consumer input's Gram matrix): {moved} of {kept} kept units "
                       f"differ from the scores' choice")
        if self.skipped:
            out.append("scores' choice kept in: " + ", ".join(
                f"{b} ({why})" for b, why in self.skipped.items()))
        return out


def _plan(model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]]
          ) -> tuple[list[tuple[Block, str, np.ndarray]], dict[str, str]]:
    """(block, consumer input name, weight [K, N] as stored) of every block to re-choose, and
    why the other pruned blocks are not."""
    nodes = nodes_by_name(model.graph)
    todo, skipped = [], {}
    for b in structure.blocks:
        k = len(keep.get(b.name, range(b.n_units)))
        if k in (0, b.n_units):
            continue
        if len(b.consumers) != 1:
            skipped[b.name] = f"{len(b.consumers)} consumers"
            continue
        c = b.consumers[0]
        node = nodes[c.node]
        got = consumer_matrix(node, c)
        if got is None:
            skipped[b.name] = f"its consumer {node.op_type} is not a plain matrix product"
            continue
        todo.append((b, node.inputs[c.data_index].name, got[0]))  # obs_keep copies it
    return todo, skipped


def _grams(model: ir.Model, cal: CalibrationSet, todo: list[tuple[Block, str, np.ndarray]],
           providers: Sequence[str] | None) -> dict[str, np.ndarray]:
    """X^T X of each block's consumer input over the real tokens, a dense pass per group of
    blocks whose matrices fit :data:`GRAM_BYTES` (each pass runs only what its values need)."""
    proto = ir.to_proto(model)
    passes: list[list[tuple[Block, str, np.ndarray]]] = [[]]
    size = 0
    for item in todo:
        k = item[2].shape[0]
        if passes[-1] and size + 8 * k * k > GRAM_BYTES:
            passes.append([])
            size = 0
        passes[-1].append(item)
        size += 8 * k * k
    out: dict[str, np.ndarray] = {}
    for group in passes:
        names = sorted({x for _, x, _ in group})
        for b, _, w in group:
            out[b.name] = np.zeros((w.shape[0], w.shape[0]))
        for chunk, values in prefix_runs(proto, cal, names,
                                         list(providers) if providers else None):
            for b, x, _ in group:
                r = rows(values[x], b.consumers[0].data_axis,
                         chunk.feeds.get(MASK_INPUT)).astype(np.float64)
                out[b.name] += r.T @ r
    return out


def _spans(b: Block) -> list[np.ndarray]:
    """Each unit's rows of the consumer weight."""
    c = b.consumers[0]
    return [b.indices([u], c.role, c.repeat, c.offset, c.group) for u in range(b.n_units)]


def obs_keep(gram: np.ndarray, weight: np.ndarray, spans: list[np.ndarray], k: int,
             damping: float = DAMPING) -> list[int]:
    """The ``k`` units (row sets ``spans`` of ``weight`` [K, N]) to keep, removing the others
    greedily by structured OBS on ``gram`` (X^T X, [K, K]): see the module doc. Units of one row
    each go in up to :data:`STEPS` batches of the cheapest; wider units (heads) one at a time.
    The removed rows leave H^-1 and W after each step, so each update works on what is left."""
    n_units = len(spans)
    diag = np.diag(gram)
    mean = float(diag.mean()) if diag.size else 0.0
    hinv = np.linalg.inv(gram + damping * (mean if mean > 0 else 1.0) * np.eye(len(gram)))
    w = np.array(weight, np.float64)
    live = np.arange(len(gram))  # the original rows still in hinv and w, ascending
    alive = np.ones(n_units, bool)
    scalar = all(len(s) == 1 for s in spans)
    unit_rows = np.array([s[0] for s in spans]) if scalar else None
    to_drop = n_units - k
    step = max(1, math.ceil(to_drop / STEPS)) if scalar else 1
    while to_drop > 0:
        if scalar:
            units = np.flatnonzero(alive)
            at = np.searchsorted(live, unit_rows[units])
            cost = (w[at] ** 2).sum(1) / np.maximum(np.diag(hinv)[at], 1e-300)
            drop = units[np.argsort(cost, kind="stable")[:min(step, to_drop)]]
        else:
            best = None
            for u in np.flatnonzero(alive):
                at = np.searchsorted(live, spans[u])
                cost = float(np.sum(w[at] * np.linalg.solve(hinv[np.ix_(at, at)], w[at])))
                if best is None or cost < best[0]:
                    best = (cost, u)
            drop = np.array([best[1]])
        at = np.searchsorted(live, np.concatenate([spans[u] for u in drop]))
        both = np.linalg.solve(hinv[np.ix_(at, at)], np.concatenate([w[at], hinv[at, :]], axis=1))
        w -= hinv[:, at] @ both[:, :w.shape[1]]
        hinv -= hinv[:, at] @ both[:, w.shape[1]:]
        rest = np.ones(len(live), bool)
        rest[at] = False
        hinv, w, live = hinv[np.ix_(rest, rest)], w[rest], live[rest]
        alive[drop] = False
        to_drop -= len(drop)
    return [int(u) for u in np.flatnonzero(alive)]


def choose_within(model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]],
                  cal: CalibrationSet, providers: Sequence[str] | None = None,
                  damping: float = DAMPING) -> Choice:
    """``keep`` with each re-choosable block's units chosen for the refit (the module doc): the
    same count per block, so the same MACs."""
    todo, skipped = _plan(model, structure, keep)
    grams = _grams(model, cal, todo, providers) if todo else {}
    out = {name: list(units) for name, units in keep.items()}
    changed = {}
    for b, _, w in todo:
        chosen = obs_keep(grams.pop(b.name), w, _spans(b), len(keep[b.name]), damping)
        changed[b.name] = len(set(chosen) - set(keep[b.name]))
        out[b.name] = chosen
    return Choice(out, changed, skipped)
