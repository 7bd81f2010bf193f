"""Stage *verify*: the slim graph must reproduce the masked dense graph.

Checked on inputs of two batch sizes and two sequence lengths, one of them longer than any
calibration sample (so a shape constant frozen at the calibration length would be caught), and for
a model with a dynamic image size on larger images too, for every output. A failure is an error: a
wrong model is never written. A case the input model itself cannot run (a sequence past its
position table) is skipped and reported, not failed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from optin_onnx.analysis import Structure, pruned_feeds
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.errors import OptinError, first_line
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.metrics import max_abs_error
from optin_onnx.probe import grow_images, image_inputs, sample_feeds, sequence_inputs
from optin_onnx.runtime import session


@dataclass
class VerifyResult:
    """What verify compared. ``max_abs_err`` is the largest ``|slim - masked dense|``;
    ``max_scaled_err`` the largest of those divided by ``max(1, max |masked dense output|)`` per
    output, which is what ``tolerance`` bounds: absolute for outputs within [-1, 1], relative to
    the output's scale above (float32 rounding grows with the values' magnitude)."""

    max_abs_err: float
    max_scaled_err: float
    tolerance: float
    cases: list[str] = field(default_factory=list)
    #: Check shapes the input model itself cannot run at, each with onnxruntime's reason.
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """A NaN or infinite difference fails at any tolerance: it is no evidence of equality."""
        return (math.isfinite(self.max_abs_err) and math.isfinite(self.max_scaled_err)
                and self.max_scaled_err <= self.tolerance)

    def failure(self) -> str:
        """The one-line reason a failed result fails."""
        if not (math.isfinite(self.max_abs_err) and math.isfinite(self.max_scaled_err)):
            return ("verification failed: the slim graph and the masked dense graph give "
                    "non-finite outputs or differences (NaN or Inf) on the check inputs")
        return (f"verification failed: the slim graph differs from the masked dense graph by "
                f"{self.max_abs_err:.2e} ({self.max_scaled_err:.2e} relative to the output's "
                f"scale, > {self.tolerance:g})")

    def to_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "max_scaled_err": self.max_scaled_err,
                "tolerance": self.tolerance, "tolerance_rule": TOLERANCE_RULE,
                "cases": self.cases, "skipped": self.skipped, "passed": self.passed}


#: How the tolerance is applied, as the report states it.
TOLERANCE_RULE = "max |slim - dense| / max(1, max |dense|), per output"

#: What onnxruntime raises when a model cannot run on the given inputs (its own exception types).
RUN_ERRORS = tuple(v for v in vars(_ort_state).values()
                   if isinstance(v, type) and issubclass(v, Exception))


def worst(*errors: float) -> float:
    """The largest error, NaN if any is NaN: ``max`` would skip a NaN that is not first (NaN
    compares false), turning "no comparison possible" into a pass."""
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


#: A model with a dynamic image size is also checked on images this much taller and wider.
GROW_PIXELS = 32


def verify_cases(cal: CalibrationSet, seq_names: set[str], image_names: set[str] = frozenset()
                 ) -> list[tuple[int, int | None, int]]:
    """(batch, sequence, extra pixels) cases: batch 1 and 3; the mean real length and 8 tokens
    longer than the longest calibration sample (no sequence axis: batch sizes only); images
    :data:`GROW_PIXELS` larger too where the image size is dynamic."""
    if not seq_names & set(cal.feeds):
        grown = [(3, None, GROW_PIXELS)] if image_names & set(cal.feeds) else []
        return [(1, None, 0), (3, None, 0)] + grown
    longest = max(cal.feeds[k].shape[1] for k in seq_names & set(cal.feeds))
    short = max(1, int(round(cal.mean_length)))
    return [(b, s, 0) for b in (1, 3) for s in (short, longest + 8)]


def verify(dense: ir.Model, slim: onnx.ModelProto, structure: Structure,
           keep: Mapping[str, Sequence[int]], cal: CalibrationSet, tolerance: float = 1e-4,
           providers: Sequence[str] | None = None) -> VerifyResult:
    reference = session(ir.to_proto(masked_model(dense, structure, unit_masks(structure, keep))),
                        providers)
    candidate = session(slim, providers)
    result = VerifyResult(0.0, 0.0, tolerance)
    # A KV cache shrinks with the heads kept: the slim model reads and writes the kept part.
    changes = structure.interface(keep)
    names = [o.name for o in reference.get_outputs()]
    images = image_inputs(dense)
    for batch, seq, grow in verify_cases(cal, sequence_inputs(dense), images):
        feeds = sample_feeds(cal.feeds, batch, seq, sequence_inputs(dense))
        if grow:
            feeds = grow_images(feeds, images, grow)
        label = f"{batch}x{seq}" if seq else f"{batch}" + (f" +{grow}px" if grow else "")
        try:
            want = reference.run(None, feeds)
        except RUN_ERRORS as exc:
            # A shape the input model cannot take (e.g. past its position table) says nothing
            # about the prune: skip it, with the reason.
            result.skipped.append(f"{label}: the input model cannot run at this shape "
                                  f"({first_line(exc)})")
            continue
        want = [changes[name].take(w) if name in changes else w
                for name, w in zip(names, want)]
        try:
            got = candidate.run(None, pruned_feeds(feeds, changes))
        except RUN_ERRORS as exc:
            raise OptinError(f"verification failed: the slim graph cannot run at case {label}, "
                             f"where the masked dense graph can ({first_line(exc)})") from None
        if any(w.shape != g.shape for w, g in zip(want, got)):
            raise OptinError(f"verification failed: output shapes differ at case {label}")
        for w, g in zip(want, got):
            if not w.size:
                continue
            err = max_abs_error(w, g)
            scale = max(1.0, float(np.max(np.abs(w.astype(np.float64)))))
            result.max_abs_err = worst(result.max_abs_err, err)
            result.max_scaled_err = worst(result.max_scaled_err, err / scale)
        result.cases.append(label)
    if not result.cases:
        raise OptinError("verification failed: the input model runs at none of the check shapes "
                         "(" + "; ".join(result.skipped) + ")")
    return result
