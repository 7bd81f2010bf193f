"""Stage *verify*: the slim graph must reproduce the masked dense graph.

Checked on inputs of two batch sizes and two sequence lengths, one of them longer than any
calibration sample (so a shape constant frozen at the calibration length would be caught), and for
a model with a dynamic image size on larger images too, for every output. A failure is an error: a wrong model is never written.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.errors import OptinError
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.metrics import max_abs_error
from optin_onnx.probe import grow_images, image_inputs, sample_feeds, sequence_inputs
from optin_onnx.runtime import session


@dataclass
class VerifyResult:
    max_abs_err: float
    tolerance: float
    cases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """A NaN or infinite difference fails at any tolerance: it is no evidence of equality."""
        return math.isfinite(self.max_abs_err) and self.max_abs_err <= self.tolerance

    def failure(self) -> str:
        """The one-line reason a failed result fails."""
        if not math.isfinite(self.max_abs_err):
            return ("verification failed: the slim graph and the masked dense graph give "
                    "non-finite outputs or differences (NaN or Inf) on the check inputs")
        return (f"verification failed: the slim graph differs from the masked dense graph by "
                f"{self.max_abs_err:.2e} (> {self.tolerance:g})")

    def to_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "tolerance": self.tolerance,
                "cases": self.cases, "passed": self.passed}


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
    result = VerifyResult(0.0, tolerance)
    images = image_inputs(dense)
    for batch, seq, grow in verify_cases(cal, sequence_inputs(dense), images):
        feeds = sample_feeds(cal.feeds, batch, seq, sequence_inputs(dense))
        if grow:
            feeds = grow_images(feeds, images, grow)
        want = reference.run(None, feeds)
        got = candidate.run(None, feeds)
        if any(w.shape != g.shape for w, g in zip(want, got)):
            raise OptinError(f"verification failed: output shapes differ at case {batch}, "
                             f"{seq}, +{grow} px")
        errors = [max_abs_error(w, g) for w, g in zip(want, got)]
        result.max_abs_err = worst(result.max_abs_err, *errors)
        result.cases.append(f"{batch}x{seq}" if seq else
                            f"{batch}" + (f" +{grow}px" if grow else ""))
    return result
