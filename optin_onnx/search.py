"""Stage *search*: the mask that keeps the most importance within a FLOPs budget.

As in OPTIN's code (and Kwon et al.): rank heads globally and neurons globally; for every number
of kept heads, fill the remaining budget with the best neurons; keep the split with the largest
total importance. No per-layer quotas. Costs come from :class:`~optin_onnx.flops.MacModel`, so a
head's price includes its share of the attention's s^2 terms at the chosen sequence length.

Neurons are taken in *chunks* of ``width_multiple`` (a layer's best, then its next best, ...) so
every FFN width stays a multiple of it: widths that break SIMD or tensor-core tiling make a model
with fewer FLOPs run slower.

Conv channel groups (CNNs) break the premise of that search: a conv between two groups costs the
product of their widths, so a unit has no fixed price. There the search is greedy: starting from
the dense model, repeatedly drop the chunk of a block that loses the least importance per MAC
saved (at the current widths), until the budget is met, then give back the most important
dropped chunks that still fit (the last steps can overshoot). Channel counts stay multiples of
``channel_multiple`` (default 8) where the group has at least that many, and a group is never
emptied.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optin_onnx.analysis import Structure
from optin_onnx.errors import OptinError
from optin_onnx.flops import MacModel


@dataclass
class SearchResult:
    keep: dict[str, list[int]]
    fraction: float  # predicted MACs kept / dense MACs
    importance: float

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.keep.items()}


@dataclass
class _Item:
    block: str
    units: list[int]
    score: float
    cost: float


def _chunks(name: str, scores: np.ndarray, size: int, unit_cost: float,
            units: np.ndarray) -> list[_Item]:
    """``units`` of a block, best first, cut into chunks of ``size``."""
    order = list(units[np.argsort(-scores[units], kind="stable")])
    return [_Item(name, [int(u) for u in order[i:i + size]], float(scores[order[i:i + size]].sum()),
                  unit_cost * len(order[i:i + size])) for i in range(0, len(order), size)]


def search(structure: Structure, importance: Mapping[str, np.ndarray], macs: MacModel,
           flops: float, *, prune: str = "both", width_multiple: int = 1,
           channel_multiple: int = 8, allow_block_removal: bool = False,
           alive: Mapping[str, Sequence[int]] | None = None) -> SearchResult:
    """Choose kept units for every block so that predicted MACs <= ``flops`` x dense MACs.

    ``alive`` (block name -> units; iterative pruning): only these units may be kept, the others
    were dropped by an earlier round."""
    if not 0.0 < flops <= 1.0:
        raise OptinError(f"--flops must be in (0, 1], got {flops}")
    if prune not in ("heads", "neurons", "both"):
        raise OptinError(f"--prune must be heads, neurons or both, got '{prune}'")
    if channel_multiple < 1:
        raise OptinError(f"--channel-multiple must be at least 1, got {channel_multiple}")
    budget = flops * macs.total
    units = {b.name: np.arange(b.n_units) if alive is None else
             np.asarray(sorted(alive.get(b.name, range(b.n_units))), dtype=int)
             for b in structure.blocks}
    if not macs.affine or any(b.kind == "channels" for b in structure.blocks):
        return _greedy(structure, importance, macs, flops, prune, width_multiple,
                       channel_multiple, allow_block_removal, units)
    fixed: list[_Item] = []  # always kept
    heads: list[_Item] = []
    neurons: list[list[_Item]] = []  # per block, chunks in order
    for b in structure.blocks:
        pruned = prune == "both" or (prune == "heads") == (b.kind == "attention")
        size = 1 if b.kind == "attention" else max(1, width_multiple)
        items = _chunks(b.name, np.asarray(importance[b.name], dtype=np.float64), size,
                        macs.unit[b.name], units[b.name])
        if not pruned:
            fixed.extend(items)
            continue
        if not allow_block_removal and items:
            fixed.append(items.pop(0))
        if b.kind == "attention":
            heads.extend(items)
        else:
            neurons.append(items)
    floor = macs.base + sum(i.cost for i in fixed)
    if floor > budget * (1 + 1e-9):
        raise OptinError(f"FLOPs budget {flops:g} is impossible: the smallest model this search may "
                         f"produce keeps {floor / macs.total:.3f} of the FLOPs"
                         + ("" if allow_block_removal else " (try --allow-block-removal)"))
    heads.sort(key=lambda i: -i.score)
    flat = sorted((c for chunks in neurons for c in chunks), key=lambda i: -i.score)
    rank = {id(c): (k, chunks) for chunks in neurons for k, c in enumerate(chunks)}

    best: tuple[float, list[_Item]] | None = None
    head_cost = head_score = 0.0
    for n_heads in range(len(heads) + 1):
        if n_heads:
            head_cost += heads[n_heads - 1].cost
            head_score += heads[n_heads - 1].score
        room = budget - floor - head_cost
        if room < -1e-9 * macs.total:
            break
        taken: set[int] = set()
        chosen, score = [], head_score
        for c in flat:
            k, chunks = rank[id(c)]
            if c.cost <= room + 1e-9 * macs.total and (k == 0 or id(chunks[k - 1]) in taken):
                taken.add(id(c))
                chosen.append(c)
                room -= c.cost
                score += c.score
        if best is None or score > best[0]:
            best = (score, heads[:n_heads] + chosen)
    assert best is not None
    keep: dict[str, list[int]] = {b.name: [] for b in structure.blocks}
    for item in fixed + best[1]:
        keep[item.block].extend(item.units)
    keep = {k: sorted(v) for k, v in keep.items()}
    fraction = macs.fraction({k: len(v) for k, v in keep.items()})
    return SearchResult(keep, fraction, best[0] + sum(i.score for i in fixed))


def _removal_steps(kind: str, n: int, width_multiple: int, channel_multiple: int,
                   allow_block_removal: bool) -> list[int]:
    """Sizes of the successive chunks a block may lose, least important first."""
    if kind == "channels":
        if n < channel_multiple:
            return [1] * (n - 1)
        top = (n - 1) // channel_multiple * channel_multiple  # largest multiple below n
        return ([n - top] if top else []) + [channel_multiple] * (top // channel_multiple - 1)
    size = 1 if kind == "attention" else max(1, width_multiple)
    steps = [size] * (n // size) + ([n % size] if n % size else [])
    return steps if allow_block_removal else steps[:-1]


def _greedy(structure: Structure, importance: Mapping[str, np.ndarray], macs: MacModel,
            flops: float, prune: str, width_multiple: int, channel_multiple: int,
            allow_block_removal: bool, units: Mapping[str, np.ndarray]) -> SearchResult:
    budget = flops * macs.total
    kept = {b.name: len(units[b.name]) for b in structure.blocks}
    scores_of = {b.name: np.asarray(importance[b.name], dtype=np.float64)
                 for b in structure.blocks}
    order, steps = {}, {}
    for b in structure.blocks:
        u = units[b.name]
        order[b.name] = list(u[np.argsort(scores_of[b.name][u], kind="stable")])  # worst first
        pruned = b.kind == "channels" or prune == "both" or \
            (prune == "heads") == (b.kind == "attention")
        steps[b.name] = _removal_steps(b.kind, len(u), width_multiple, channel_multiple,
                                       allow_block_removal) if pruned and len(u) else []
    terms_of = {b.name: [t for t in macs.terms if any(b.name in f[0] for f in t[1])]
                for b in structure.blocks}
    removed = {b.name: 0 for b in structure.blocks}  # units dropped so far
    taken = {b.name: 0 for b in structure.blocks}  # chunks dropped so far

    def change(name: str, by: int) -> float:
        """MACs added by keeping ``by`` more units of ``name`` (negative: fewer)."""
        if not macs.terms:
            return macs.unit[name] * by
        other = dict(kept, **{name: kept[name] + by})
        return sum(macs.term(t, other) - macs.term(t, kept) for t in terms_of[name])

    floor = dict(kept)
    for name, st in steps.items():
        floor[name] -= sum(st)
    if macs.macs(floor) > budget * (1 + 1e-9):
        raise OptinError(f"FLOPs budget {flops:g} is impossible: the smallest model this search may "
                         f"produce keeps {macs.fraction(floor):.3f} of the FLOPs")
    while macs.macs(kept) > budget * (1 + 1e-9):
        best = None
        for name in kept:
            if taken[name] >= len(steps[name]):
                continue
            size = steps[name][taken[name]]
            units = order[name][removed[name]:removed[name] + size]
            cost = float(scores_of[name][units].sum())
            gain = -change(name, -size)
            ratio = cost / gain if gain > 0 else np.inf
            if best is None or ratio < best[0]:
                best = (ratio, name, size)
        _, name, size = best
        kept[name] -= size
        removed[name] += size
        taken[name] += 1
    # Chunks are coarse (8 channels of a wide conv can be a tenth of the MACs): the last steps
    # may overshoot the budget. Give back the most important dropped chunks that still fit.
    while True:
        fits = []
        for name in kept:
            if not taken[name]:
                continue
            size = steps[name][taken[name] - 1]
            units = order[name][removed[name] - size:removed[name]]
            if macs.macs(kept) + change(name, size) <= budget * (1 + 1e-9):
                fits.append((float(scores_of[name][units].sum()), name, size))
        if not fits:
            break
        _, name, size = max(fits)
        kept[name] += size
        removed[name] -= size
        taken[name] -= 1
    keep = {name: sorted(int(u) for u in order[name][removed[name]:]) for name in kept}
    total = sum(float(scores_of[n][keep[n]].sum()) for n in keep)
    return SearchResult(keep, macs.fraction(kept), total)
