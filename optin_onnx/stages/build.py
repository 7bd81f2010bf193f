"""Stage *build*: the slim model from a selection: reconstruct (optional) -> rewrite ->
canonicalize -> simplify.

The model the slim one must equal once masked (what verify compares against) is the prepared
model, or its correction (``--reconstruct scales`` or ``refit``, :mod:`optin_onnx.reconstruct`):
:attr:`Built.reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import pruned_feeds
from optin_onnx.errors import OptinError
from optin_onnx.options import PruneOptions
from optin_onnx.passes.canonicalize_reshapes import canonicalize_reshapes
from optin_onnx.probe import (calibration_length, dummy_feeds, probe, sample_feeds,
                              sequence_inputs)
from optin_onnx.reconstruct import correct
from optin_onnx.rewrite import rewrite
from optin_onnx.scoring.types import Units
from optin_onnx.simplify import choose as choose_simplified
from optin_onnx.stages.clock import Clock
from optin_onnx.stages.prepare import Prepared

#: (batch, sequence) of the two probe runs canonicalize compares: an element becomes constant only
#: where both runs agree, so the two sizes differ in both axes.
CANONICALIZE_PROBES = ((3, 11), (2, 7))


def _canonicalize_probes(model: ir.Model, calib: dict[str, np.ndarray]
                         ) -> list[dict[str, np.ndarray]] | None:
    """Two probe runs at :data:`CANONICALIZE_PROBES`, or, for a model that cannot run at those
    lengths (a window size), at the calibration's own length and twice it; None if neither."""
    n = calibration_length(model, calib)
    tries = [CANONICALIZE_PROBES] + ([((3, n), (2, 2 * n))] if n is not None else [])
    for sizes in tries:
        try:
            return [probe(model, dummy_feeds(model, batch=b, seq=s, like=calib)) for b, s in sizes]
        except OptinError:
            continue
    return None


def _canonicalize(model: ir.Model, calib: dict[str, np.ndarray]) -> list[str]:
    """Replace ``model``'s run-time Reshape targets by constants where both probe runs agree;
    the report's note. Its own function so that the probe runs (every value of the model, a
    gigabyte for an image backbone) are freed before the next stage."""
    probes = _canonicalize_probes(model, calib)
    if not probes:
        return ["run-time Reshape targets kept: the model runs at none of the canonicalize "
                "probe lengths"]
    n_fixed = canonicalize_reshapes(model, probes)
    return [f"{n_fixed} run-time Reshape targets replaced by constants (their shape-computing "
            f"nodes removed)"] if n_fixed else []


@dataclass(frozen=True)
class Built:
    """``slim``: the model to write; ``reference``: the dense model it must equal once masked
    (see the module doc); ``notes``: what the build changed or declined, for the report."""

    reference: ir.Model
    slim: onnx.ModelProto
    notes: tuple[str, ...]


def build(prep: Prepared, options: PruneOptions, keep: Units, *,
          clock: Clock | None = None) -> Built:
    """The slim model keeping ``keep``; ``options.reconstruct``, ``canonicalize``, ``simplify``
    and the last latency case (onnxsim's timing shape) say how."""
    clock = clock or Clock()
    notes = []
    reference = prep.model
    if options.reconstruct != "none":
        with clock("reconstruct"):
            # Fitted on the scoring samples; the refit is checked on the held-out ones (none
            # without them).
            reference, correction_notes = correct(
                options.reconstruct, prep.model, prep.structure, keep, prep.cal,
                prep.held if prep.has_held else None, prep.providers)
            notes.extend(correction_notes)
    with clock("rewrite"):
        slim_ir = rewrite(reference, prep.structure, keep)
    # The slim model's own inputs: a KV cache keeps the kept heads' part.
    calib = pruned_feeds(prep.calib, prep.structure.interface(keep))
    if options.canonicalize:
        with clock("canonicalize"):
            notes.extend(_canonicalize(slim_ir, calib))
    slim = ir.to_proto(slim_ir)
    del slim_ir  # the proto is the model from here on; onnxsim makes copies of its own
    with clock("simplify"):
        batch, seq = (list(options.latency_cases) or [(1, prep.seq_len or None)])[-1]
        feeds = sample_feeds(calib, batch, seq, sequence_inputs(reference))
        slim, why = choose_simplified(slim, feeds, options.simplify, prep.providers)
        if why:
            notes.append(why)
    return Built(reference, slim, tuple(notes))
