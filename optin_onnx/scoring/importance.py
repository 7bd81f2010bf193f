"""Importance criteria: one interface, one registry (after Torch-Pruning's ``pruner/importance.py``).

Every criterion turns a model, its structure and the calibration set into
:class:`~optin_onnx.scoring.types.Scores` (one importance per unit, higher = keep); the search,
the rewrite and the checks after it never ask which criterion it was. The pipeline (``--method``)
and the benchmarks look criteria up by name in :data:`IMPORTANCES`, so a new criterion is a class
here and one registry entry, not a branch in each caller.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.errors import OptinError
from optin_onnx.scoring.baselines import score_magnitude, score_random
from optin_onnx.scoring.trajectory import score_fast
from optin_onnx.scoring.types import Progress, ScoreConfig, Scores, Units


class Importance(Protocol):
    """What every criterion offers."""

    #: Whether the scores depend on what is already pruned: only then does pruning in rounds
    #: (``base``) measure anything a single scoring would not.
    rescores: ClassVar[bool]

    @classmethod
    def from_config(cls, cfg: ScoreConfig) -> Importance:
        """The criterion with whatever settings it takes from ``cfg``."""
        ...

    def score(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
              base: Units | None = None, progress: Progress | None = None) -> Scores:
        """Importances of the units ``base`` keeps (every unit without a base); ``progress``
        is called with the number of units scored as scoring advances, where it takes time."""
        ...


@dataclass(frozen=True)
class OptinImportance:
    """OPTIN's trajectory score: the loss along every later layer, plus the output term."""

    cfg: ScoreConfig = ScoreConfig()
    rescores: ClassVar[bool] = True
    features: ClassVar[str] = "trajectory"

    @classmethod
    def from_config(cls, cfg: ScoreConfig) -> OptinImportance:
        return cls(replace(cfg, features=cls.features))

    def score(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
              base: Units | None = None, progress: Progress | None = None) -> Scores:
        return score_fast(model, structure, cal, self.cfg, progress, base=base)


@dataclass(frozen=True)
class LocalImportance(OptinImportance):
    """The ablation of OPTIN's trajectory: the loss at the unit's own layer only."""

    features: ClassVar[str] = "local"


@dataclass(frozen=True)
class MagnitudeImportance:
    """Data-free: the squared L2 norm of the weights sliced away with the unit."""

    rescores: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: ScoreConfig) -> MagnitudeImportance:
        return cls()

    def score(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
              base: Units | None = None, progress: Progress | None = None) -> Scores:
        return score_magnitude(model, structure)


@dataclass(frozen=True)
class RandomImportance:
    """Seeded uniform random importances: the floor every criterion should beat."""

    seed: int = 0
    rescores: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: ScoreConfig) -> RandomImportance:
        return cls(cfg.seed)

    def score(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
              base: Units | None = None, progress: Progress | None = None) -> Scores:
        return score_random(structure, self.seed)


#: Every criterion by the name ``--method`` and the benchmarks use.
IMPORTANCES: dict[str, type[Importance]] = {
    "optin": OptinImportance,
    "local": LocalImportance,
    "magnitude": MagnitudeImportance,
    "random": RandomImportance,
}


def make_importance(method: str, cfg: ScoreConfig = ScoreConfig()) -> Importance:
    """The criterion registered as ``method``, configured from ``cfg``."""
    if method not in IMPORTANCES:
        raise OptinError(f"importance criterion must be one of {', '.join(IMPORTANCES)}, "
                         f"got '{method}'")
    return IMPORTANCES[method].from_config(cfg)
