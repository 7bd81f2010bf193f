"""Stage *reconstruct*: correct the kept weights so the pruned model computes what the dense one
did, in closed form and without retraining.

``refit`` (:mod:`.layerwise`): a ridge refit of the layer that reads each block's kept
units, against the dense model's residual stream, and of the convs downstream of a pruned group
channel by channel (:mod:`.channelwise`), kept only where held-out samples confirm it.
``scales`` (:mod:`.scales`): Kwon et al.'s one least-squares scale per kept unit. ``none``: the
selection's weights as they are. Either correction only changes constants of the dense graph, so
the rewrite slices the corrected weights and verify compares against the corrected model, masked.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, get_args

import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.options import Reconstruct
from optin_onnx.reconstruct.layerwise import DAMPINGS, BlockRefit, RefitResult, refit
from optin_onnx.reconstruct.scales import Correction, ReconstructResult, reconstruct

#: ``--reconstruct`` choices (:data:`optin_onnx.options.Reconstruct`).
CORRECTIONS: tuple[str, ...] = get_args(Reconstruct)


class Corrected(NamedTuple):
    """A corrected model and the report's lines about the correction."""

    model: ir.Model
    notes: list[str]


def correct(how: str, model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]],
            cal: CalibrationSet, held: CalibrationSet | None,
            providers: Sequence[str] | None = None) -> Corrected:
    """``model`` corrected by ``how`` (one of :data:`CORRECTIONS`) for the selection ``keep``:
    fitted on ``cal`` (the scoring samples), checked on ``held`` (refit only: without held-out
    samples nothing could reject a fit that does not generalise, so none is made)."""
    if how == "none":
        return Corrected(model, [])
    if how == "scales":
        got = reconstruct(model, structure, keep, cal, providers=providers)
        return Corrected(got.model, got.notes())
    if how == "refit":
        if held is None:
            return Corrected(model, ["refit not applied: no held-out calibration samples to check "
                                     "it on (give the calibration file more samples than "
                                     "--samples)"])
        fitted = refit(model, structure, keep, cal, held, providers)
        return Corrected(fitted.model, fitted.notes())
    raise ValueError(f"unknown correction {how!r}; expected one of {CORRECTIONS}")


__all__ = ["CORRECTIONS", "DAMPINGS", "BlockRefit", "Corrected", "Correction",
           "ReconstructResult", "RefitResult", "correct", "reconstruct", "refit"]
