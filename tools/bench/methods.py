"""Importance per method, and the selection it gives at each FLOPs level.

Every method shares the analysis, the MAC model, the search and the rewrite; only the importance
differs: ``optin`` (trajectory scores), ``local`` (ablation: the unit's own layer output only),
``magnitude`` (weights sliced away with the unit), ``random`` (one run per seed of
:data:`SEEDS`), ``optin+ls`` and ``optin+refit`` (OPTIN's selection, then the reconstruct stage's
scales or refit: :data:`CORRECTION`), ``optin+obs`` (OPTIN's count per block, the units within
each re-chosen for the refit, ``--within refit``, then the refit). Scores are computed once per
method and run (the corrected rows reuse ``optin``'s); each level is then a search. With
``Settings.round_step`` the scored methods prune in rounds instead (``optin_onnx.iterate``): one
chain of rounds gives the selection of every level.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from optin_onnx.scoring.importance import Importance
    from optin_onnx.scoring.types import Scores
    from optin_onnx.search import SearchResult
    from optin_onnx.stages.clock import Clock
    from optin_onnx.stages.prepare import Prepared

#: Our methods, in the order their rows are written.
OURS = ("optin", "optin+ls", "optin+refit", "optin+obs", "local", "magnitude", "random")
#: Methods scored on calibration data (the others read only the weights, or nothing).
SCORED = ("optin", "optin+ls", "optin+refit", "optin+obs", "local")
#: Methods that are OPTIN's selection followed by a correction (``optin_onnx.reconstruct``).
CORRECTION = {"optin+ls": "scales", "optin+refit": "refit", "optin+obs": "refit"}
#: Methods whose units within each block are re-chosen for the refit (``--within refit``).
WITHIN = ("optin+obs",)
SEEDS = (0, 1, 2)

#: A FLOPs level -> the selection kept at it.
Picker = Callable[[float], "SearchResult"]


@dataclass(frozen=True)
class Settings:
    """What a run varies. ``lams``: output-term weights, one row each from the same scores;
    ``round_step`` 0 is one shot; ``reach``: onnxsim's farthest measured FLOPs from a level that
    still counts as it."""

    levels: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)
    samples: int = 32
    neuron_group: int = 8
    lams: tuple[float, ...] = (1.0,)
    feature: str = "auto"
    channel_multiple: int = 8
    round_step: float = 0.0
    round_teacher: str = "current"
    reach: float = 0.015


@dataclass
class Importances:
    """Scores of one run, shared across its methods (``optin`` and ``optin+ls`` score once)."""

    prep: Prepared
    settings: Settings
    #: score kind (trajectory | local) -> (one-shot scores, scoring seconds)
    _one_shot: dict[str, tuple[Scores, float]] = field(default_factory=dict)
    #: (score kind, lambda) -> (scoring seconds, {level: selection}) of one chain of rounds
    _chains: dict[tuple[str, float], tuple[float, dict[float, SearchResult]]] = field(
        default_factory=dict)

    def rounds(self, method: str) -> bool:
        """Whether ``method`` prunes in rounds in this run."""
        return bool(self.settings.round_step) and method in SCORED

    def select(self, importance: Mapping[str, np.ndarray], level: float,
               alive: Mapping[str, Sequence[int]] | None = None) -> SearchResult:
        """The search every method shares (alive: the units earlier rounds kept)."""
        from optin_onnx.search import search

        return search(self.prep.structure, importance, self.prep.macs, level,
                      channel_multiple=self.settings.channel_multiple, alive=alive)

    def _importance(self, method: str, lam: float = 1.0, seed: int = 0) -> Importance:
        """``method``'s criterion from the package's registry (corrected rows score as ``optin``),
        with this run's settings."""
        from optin_onnx.scoring.importance import make_importance
        from optin_onnx.scoring.types import ScoreConfig

        s = self.settings
        return make_importance("optin" if method in CORRECTION else method,
                               ScoreConfig(neuron_group=s.neuron_group, lam=lam, seed=seed,
                                           feature_kind=s.feature, teacher=s.round_teacher))

    def one_shot(self, method: str) -> tuple[Scores, float]:
        """(scores, scoring seconds) of a scored ``method`` in one shot, computed once per run."""
        kind = _kind(method)
        if kind not in self._one_shot:
            t0 = time.perf_counter()
            got = self._importance(method).score(self.prep.model, self.prep.structure,
                                                 self.prep.cal)
            self._one_shot[kind] = (got, time.perf_counter() - t0)
        return self._one_shot[kind]

    def pickers(self, method: str) -> dict[float, tuple[float, list[Picker]]]:
        """{lambda: (scoring seconds, one picker per seed)} of ``method``; methods that use no
        output term have one entry (lambda 1)."""
        if self.rounds(method):
            return {lam: (seconds, [lambda level, got=got: got[round(level, 6)]])
                    for lam, (seconds, got) in self._rounds(method).items()}
        if method in SCORED:
            raw, seconds = self.one_shot(method)
            runs = {lam: [raw.finalize(lam).importance] for lam in self.settings.lams}
        else:
            t0 = time.perf_counter()
            runs = {1.0: [self._importance(method, seed=seed).score(
                self.prep.model, self.prep.structure, self.prep.cal).importance
                for seed in (SEEDS if method == "random" else (0,))]}
            seconds = time.perf_counter() - t0
        return {lam: (seconds, [lambda level, imp=imp: self.select(imp, level) for imp in got])
                for lam, got in runs.items()}

    def _rounds(self, method: str) -> dict[float, tuple[float, dict[float, SearchResult]]]:
        """{lambda: (scoring seconds, {level: selection})}: one chain of rounds per lambda."""
        from optin_onnx.iterate import at_levels
        from optin_onnx.stages.clock import Clock

        kind = _kind(method)
        for lam in self.settings.lams:
            if (kind, lam) in self._chains:
                continue
            clock = Clock()
            score = partial(self._score_round, f"{method} lam {lam:g}",
                            self._importance(method, lam), clock)
            picked = at_levels(score, self.select, self.settings.levels, self.settings.round_step)
            self._chains[(kind, lam)] = (clock.seconds.get("score", 0.0), picked)
        return {lam: self._chains[(kind, lam)] for lam in self.settings.lams}

    def _score_round(self, label: str, criterion: Importance, clock: Clock,
                     base: Mapping[str, Sequence[int]] | None) -> Scores:
        """One round of the package's *select* stage scoring, its time added to ``clock`` and
        the total so far printed (a chain of rounds runs for many minutes)."""
        from optin_onnx.stages.select import score

        got = score(self.prep, criterion, base, clock=clock)
        print(f"{label}: {clock.seconds['score']:.0f} s of scoring", flush=True)
        return got


def _kind(method: str) -> str:
    """The scores a scored method uses: ``local`` ablation scores, or trajectory scores."""
    return "local" if method == "local" else "trajectory"


def mean_row(per_seed: list[dict[str, float]], level: float) -> dict[str, float]:
    """One table row: every metric averaged over the seeds' runs, and the level asked for."""
    row = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
    row["level"] = level
    return row
