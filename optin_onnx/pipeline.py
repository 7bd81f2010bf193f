"""The whole job: prepare -> select -> build -> check, then write (:mod:`optin_onnx.stages`).

This module only composes the stages, keeps their time, writes the outputs and gathers the
notes into the report; what each stage does is in its own module.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from optin_onnx.analysis import Structure, analyze_graph
from optin_onnx.flops import MacModel
from optin_onnx.io import CALIBRATION_LIMIT_BYTES, save_model
# Re-exported: the name callers (the CLI, tools) know it by.
from optin_onnx.io import calibration_for as as_calibration
from optin_onnx.options import PruneOptions
from optin_onnx.passes.unfuse_projections import split_fused_projections
from optin_onnx.probe import probe_like
from optin_onnx.report import Report
from optin_onnx.runtime import heap_kept
from optin_onnx.scoring.importance import IMPORTANCES
from optin_onnx.scoring.types import Scores
from optin_onnx.search import SearchResult
from optin_onnx.stages.build import build
from optin_onnx.stages.check import check, make_report
from optin_onnx.stages.clock import Clock
from optin_onnx.stages.prepare import CalibLike, ModelLike, as_model, prepare
from optin_onnx.stages.select import Progress, select
from optin_onnx.verify import VerifyResult

#: Importance criteria (optin_onnx.scoring.importance); all share the search, rewrite and verify
#: stages (the accuracy benchmark): optin (trajectory scores), local (the ablation: the unit's own
#: layer only), magnitude (squared L2 norm of the unit's weights), random (seeded by ``seed``).
METHODS = tuple(IMPORTANCES)


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    structure: Structure
    scores: Scores
    selection: SearchResult
    verification: VerifyResult
    stage_seconds: dict[str, float] = field(default_factory=dict)


def analyze(model: ModelLike, calib: CalibLike | None = None,
            max_calib_bytes: int = CALIBRATION_LIMIT_BYTES) -> tuple[ir.Model, Structure]:
    """Stage *analyse* on its own: the prunable blocks and what was declined. ``calib`` (as for
    :func:`prune`) only sets the probe's input shapes."""
    m = as_model(model)
    split_fused_projections(m)
    like = None if calib is None else as_calibration(m, calib, max_calib_bytes)
    return m, analyze_graph(m, probe_like(m, like))


def prune(model: ModelLike, calib: CalibLike, options: PruneOptions | None = None, *,
          output: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None,
          progress: Progress | None = None, **overrides) -> PruneResult:
    """Prune ``model`` to ``flops`` of its MACs using OPTIN trajectory scores.

    ``calib``: an .npz path or a dict of arrays, one per graph input, first axis = sample.
    Options come from ``options`` and/or keyword overrides (``flops=0.6, prune="heads"``, ...).
    With ``output`` the pruned model is written there, and with ``report_path`` the report as
    JSON (both atomically; both checked before any work: never over an input or each other).
    ``progress(done, total)`` is called while scoring.
    """
    for k in overrides:
        if not hasattr(PruneOptions, k):
            raise TypeError(f"unknown option {k!r}")
    # A new object, checked again; the caller's is left as given.
    opt = dataclasses.replace(options or PruneOptions(), **overrides)
    clock = Clock()
    with heap_kept():  # every stage runs onnxruntime many times on large inputs
        prep = prepare(model, calib, opt, writes=[("output path", output),
                                                  ("--report path", report_path)], clock=clock)
        chosen = select(prep, opt, progress=progress, clock=clock)
        built = build(prep, opt, chosen.keep, clock=clock)
        checked = check(prep, opt, built, chosen.keep, clock=clock)
        if output is not None:
            save_model(built.slim, output, input_path=prep.source)
        notes = [*prep.notes, *chosen.notes, *built.notes, *checked.notes]
        report = make_report(prep, opt, built, chosen.keep, checked, notes, clock.seconds, output,
                             stage_peaks=clock.peaks)
        if report_path is not None:
            report.to_json(report_path)
    return PruneResult(built.slim, report, prep.structure, chosen.scores, chosen.selection,
                       checked.verification, clock.seconds)


__all__ = ["METHODS", "PruneOptions", "PruneResult", "prune", "analyze", "as_calibration",
           "as_model", "MacModel"]
