"""What exact scoring will cost, and the neuron group that keeps it within a budget.

A candidate's score runs the model downstream of its block's consumers (the suffix, from cached
dense activations: :mod:`optin_onnx.scoring.suffix`), over every scoring sample. Its cost is
therefore the share of the model's MACs downstream of those consumers, in units of one dense
forward pass of the scoring samples, and the stage's cost is that share summed over candidates:

    cost(g) = sum over blocks b of  candidates_b(g) x downstream_share(b)

with ``candidates_b(g)`` the block's units for attention (heads are always scored one by one)
and ``ceil(units / g)`` for neurons and channels scored in proxy-ordered groups of ``g``
(:mod:`optin_onnx.scoring.candidates`). At a fixed ``g`` the sum grows with units x depth
(each added layer adds units and lengthens every earlier unit's suffix). ``--neuron-group auto`` (the default) takes the finest group in :data:`GROUPS` whose cost
fits :data:`SCORING_BUDGET`, so scoring time follows the model's dense forward time instead of
its units x depth; the report states the group and the estimate. The estimate counts
matrix-product MACs only, so a run takes longer than it says (softmax, normalisation and the
loss's own arithmetic are left out): the budget is set in the estimate's units, and the measured
time per estimated dense forward is in docs/RESULTS.md.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.flops import MacModel
from optin_onnx.graph import nodes_by_name

#: Estimated dense forwards of the scoring samples that ``auto`` lets scoring take (one round).
#: Groups of 32 on MiniLM (estimate 158) score about as well as 16 and 8 (docs/RESULTS.md), and
#: a run costs more than its estimate; docs/DESIGN.md, "The scoring budget", says what each model
#: gets.
SCORING_BUDGET = 200.0
#: Group sizes ``auto`` chooses from, finest first: 8 is the finest because it already scores as
#: well as exact per-neuron scores on MiniLM at a fraction of the cost (docs/RESULTS.md).
GROUPS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GroupChoice:
    """The neuron group scoring uses, the estimated cost of scoring with it (dense forwards of
    the scoring samples, one round) and whether ``auto`` chose it."""

    group: int
    cost: float
    auto: bool

    def note(self) -> str:
        how = (f"chosen for a scoring budget of {SCORING_BUDGET:g}" if self.auto
               else "as --neuron-group asks")
        what = "exact per-unit scores" if self.group == 1 else \
            f"neurons and channels scored in groups of {self.group}"
        return (f"{what} ({how}): scoring estimated at {self.cost:.0f} dense forwards of the "
                f"scoring samples")


def downstream_share(model: ir.Model, structure: Structure, macs: MacModel) -> dict[str, float]:
    """Per block, the share of the model's matrix-product MACs downstream of its consumers'
    outputs: what one candidate's suffix run costs, in dense forwards."""
    if not macs.total:
        return {b.name: 0.0 for b in structure.blocks}
    nodes = nodes_by_name(model.graph)
    out = {}
    for b in structure.blocks:
        reached = _downstream(nodes[c.node] for c in b.consumers)
        out[b.name] = sum(macs.nodes.get(name, 0) for name in reached) / macs.total
    return out


def _downstream(starts: Iterable[ir.Node]) -> set[str]:
    """Names of the nodes that read, directly or not, an output of ``starts`` (not the starts
    themselves: a candidate's change enters at their outputs)."""
    seen: set[str] = set()
    stack = [user for node in starts for v in node.outputs for user in v.consumers()]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(user for v in node.outputs for user in v.consumers())
    return seen


def scoring_cost(structure: Structure, share: dict[str, float], group: int) -> float:
    """Estimated dense forwards of the scoring samples that scoring every unit costs with
    neurons and channels in groups of ``group``."""
    return sum((b.n_units if b.kind == "attention" or group <= 1 else
                math.ceil(b.n_units / group)) * share[b.name] for b in structure.blocks)


def choose_group(model: ir.Model, structure: Structure, macs: MacModel,
                 asked: int | None, budget: float = SCORING_BUDGET) -> GroupChoice:
    """``asked`` (``--neuron-group N``) with its cost, or for ``None`` (``auto``) the finest of
    :data:`GROUPS` whose cost fits ``budget`` (the coarsest when none does: heads alone may
    exceed it, and they are never grouped)."""
    share = downstream_share(model, structure, macs)
    if asked is not None:
        return GroupChoice(asked, scoring_cost(structure, share, asked), False)
    for group in GROUPS:
        cost = scoring_cost(structure, share, group)
        if cost <= budget:
            return GroupChoice(group, cost, True)
    return GroupChoice(GROUPS[-1], cost, True)
