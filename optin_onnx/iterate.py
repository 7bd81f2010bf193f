"""Stages *score* and *search* in rounds: prune a little, re-score what is left, prune again.

One-shot OPTIN (the paper) scores every unit once, on the dense model, and the search then adds
those scores up as if each unit's loss did not depend on which others are gone. That holds for a
few units, not for 40 % of the FLOPs: once a layer has lost half its heads, the heads it still
has matter more than they did in the dense model. Rounds measure that instead of assuming it:

    budgets 1 > f_1 > f_2 > ... > f_n = target, falling linearly (steps=4 to 0.6: 0.9, 0.8, 0.7, 0.6)
    round k: score the units still alive with rounds 1..k-1's selection masked, then search f_k
             over the alive units only (what an earlier round dropped stays dropped)

What a later round compares against is ``ScoreConfig.teacher``
(:func:`~optin_onnx.scoring.trajectory.score_fast`, ``base``): by default the previous round's
pruned model, scored as if it were the dense one; or the dense model, a unit's score then being the
loss it adds to the current selection's own loss. Against the dense model scores can turn negative
(removing the unit pulls the calibration logits back toward the dense ones), and the selections
generalised worse on validation data (docs/DESIGN.md, "Pruning in rounds"). Each round costs
one scoring pass over the alive units, so n rounds cost about n times the one-shot scoring less
the dropped units' share.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from optin_onnx.errors import OptinError
from optin_onnx.scoring.types import Scores
from optin_onnx.search import SearchResult

#: scores of the alive units given the current selection (None: the dense model)
Scorer = Callable[[Mapping[str, Sequence[int]] | None], Scores]
#: the search: importances, FLOPs fraction, alive units (None: all) -> selection
Selector = Callable[[Mapping[str, np.ndarray], float, Mapping[str, Sequence[int]] | None],
                    SearchResult]


@dataclass
class Round:
    flops: float
    scores: Scores
    selection: SearchResult


def budgets(flops: float, steps: int) -> list[float]:
    """The FLOPs fraction each round searches for: ``steps`` equal steps from 1 down to ``flops``."""
    if steps < 1:
        raise OptinError(f"--rounds must be at least 1, got {steps}")
    return [1.0 - (1.0 - flops) * k / steps for k in range(1, steps + 1)]


def rounds(score: Scorer, select: Selector, schedule: Sequence[float]) -> Iterator[Round]:
    """One :class:`Round` per budget of ``schedule`` (decreasing), each built on the one before.

    A generator, so a caller evaluating every budget of a schedule (the accuracy benchmark's
    levels) pays for the rounds once."""
    if any(b >= a for a, b in pairwise(schedule)):
        raise OptinError(f"round budgets must decrease, got {list(schedule)}")
    keep: Mapping[str, Sequence[int]] | None = None
    for flops in schedule:
        scores = score(keep)
        selection = select(scores.importance, flops, keep)
        keep = selection.keep
        yield Round(flops, scores, selection)


def chain(levels: Sequence[float], step: float) -> list[float]:
    """The round budgets ``1 - step, 1 - 2 step, ...`` down to the lowest of ``levels``.

    For each level L its prefix is exactly ``budgets(L, (1 - L) / step)``, the schedule
    ``prune(flops=L, steps=...)`` runs, so one chain of rounds serves every level (benchmarks)."""
    if not 0 < step < 1:
        raise OptinError(f"round step must be in (0, 1), got {step:g}")
    counts = [(1 - level) / step for level in levels]
    if any(abs(c - round(c)) > 1e-6 or round(c) < 1 for c in counts):
        raise OptinError(f"round step {step:g}: every level must be 1 minus a whole number of "
                         f"steps, got {list(levels)}")
    n = max(round(c) for c in counts)
    return budgets(1 - n * step, n)


def at_levels(score: Scorer, select: Selector, levels: Sequence[float],
              step: float) -> dict[float, SearchResult]:
    """{level: selection} from one chain of rounds of ``step`` (see :func:`chain`)."""
    wanted = {round(level, 6) for level in levels}
    return {round(r.flops, 6): r.selection for r in rounds(score, select, chain(levels, step))
            if round(r.flops, 6) in wanted}
