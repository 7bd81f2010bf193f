"""Stage *select*: score the units, search the budget; with ``--rounds N``, N times, each round
re-scoring the units the previous one kept (:mod:`optin_onnx.iterate`).

:func:`score` and :func:`search_level` are one round's halves; :func:`select` runs the schedule
and, with ``--within refit``, re-chooses the units within blocks for the refit
(:mod:`optin_onnx.reconstruct.choose`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from optin_onnx.iterate import Round, budgets, rounds
from optin_onnx.options import PruneOptions
from optin_onnx.reconstruct.choose import choose_within
from optin_onnx.scoring.budget import GROUPS
from optin_onnx.scoring.importance import Importance, make_importance
from optin_onnx.calibrate import Chunking
from optin_onnx.scoring.types import ExecutorConfig, ScoreConfig, Scores, Units
from optin_onnx.search import SearchResult, search
from optin_onnx.stages.clock import Clock
from optin_onnx.stages.prepare import Prepared

#: Called with (units scored so far, units to score in this round) while scoring.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Selection:
    """Every round, in order; the last one's scores and selection are the result, with the
    units re-chosen within blocks for the refit where ``chosen`` is given (``--within``)."""

    rounds: tuple[Round, ...]
    notes: tuple[str, ...]
    chosen: SearchResult | None = None

    @property
    def scores(self) -> Scores:
        return self.rounds[-1].scores

    @property
    def selection(self) -> SearchResult:
        return self.chosen or self.rounds[-1].selection

    @property
    def keep(self) -> dict[str, list[int]]:
        return self.selection.keep


class _Tally:
    """Adds up the scorer's "k more units scored" into the caller's ``progress(done, total)``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, k: int) -> None:
        self.done += k
        if self.progress:
            self.progress(self.done, self.total)


def score_config(options: PruneOptions, providers: list[str], objectives: Sequence[str],
                 chunking: Chunking | None = None, group: int | None = None) -> ScoreConfig:
    """The scorers' settings from the options (the objective outputs as the prepare stage
    resolved them; candidates per run as ``chunking`` sized them under the memory limit, and
    the neuron ``group`` it chose, where given)."""
    per_run = options.candidates_per_run if chunking is None else chunking.candidates_per_run
    return ScoreConfig(lam=options.lam, tokens=options.tokens, seed=options.seed,
                       objective_outputs=tuple(objectives),
                       candidates_per_run=per_run,
                       neuron_group=group or options.neuron_group or GROUPS[0],
                       feature_kind=options.feature_kind,
                       teacher=options.round_teacher, providers=providers,
                       executor=ExecutorConfig(options.executor, options.workers,
                                               options.ray_address),
                       max_memory_bytes=None if chunking is None else chunking.limit_bytes)


def score(prep: Prepared, criterion: Importance, base: Units | None = None, *,
          progress: Progress | None = None, clock: Clock | None = None) -> Scores:
    """Importances of the units ``base`` keeps (every unit when None: the first round)."""
    total = sum(b.n_units if base is None else len(base[b.name]) for b in prep.structure.blocks)
    with (clock or Clock())("score"):
        return criterion.score(prep.model, prep.structure, prep.cal, base=base,
                               progress=_Tally(total, progress))


def search_level(prep: Prepared, options: PruneOptions, importance: Mapping[str, np.ndarray],
                 flops: float, alive: Mapping[str, Sequence[int]] | None = None, *,
                 clock: Clock | None = None) -> SearchResult:
    """The units to keep within ``flops`` of the MACs, among ``alive`` (None: all)."""
    with (clock or Clock())("search"):
        return search(prep.structure, importance, prep.macs, flops, prune=options.prune,
                      width_multiple=options.width_multiple,
                      channel_multiple=options.channel_multiple,
                      allow_block_removal=options.allow_block_removal, alive=alive)


def select(prep: Prepared, options: PruneOptions, *, progress: Progress | None = None,
           clock: Clock | None = None) -> Selection:
    """Score and search in ``options.steps`` rounds down to ``options.flops``."""
    schedule = budgets(options.flops, options.steps)
    criterion = make_importance(options.method,
                                score_config(options, prep.providers, prep.objectives,
                                             prep.chunking, prep.group.group))
    done = tuple(rounds(partial(score, prep, criterion, progress=progress, clock=clock),
                        partial(search_level, prep, options, clock=clock), schedule))
    notes = [prep.group.note()] if criterion.rescores else []
    if options.steps > 1:
        notes.append(f"{options.steps} rounds of scoring and search, at "
                     + ", ".join(f"{b:.3g}" for b in schedule) + " of the FLOPs")
    if options.method != "optin":
        notes.append(f"importance criterion: {options.method}")
    chosen = None
    if options.within == "refit":
        with (clock or Clock())("choose"):
            last = done[-1].selection
            got = choose_within(prep.model, prep.structure, last.keep, prep.cal, prep.providers)
        importance = done[-1].scores.importance
        chosen = SearchResult(got.keep, last.fraction, sum(
            float(np.asarray(importance[b])[units].sum()) for b, units in got.keep.items()))
        notes.extend(got.notes())
    return Selection(done, tuple(notes), chosen)
