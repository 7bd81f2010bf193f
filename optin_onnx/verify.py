"""Stage *verify*: the slim graph must reproduce the masked dense graph.

Checked on inputs of two batch sizes and two sequence lengths, one of them longer than any
calibration sample (so a shape constant frozen at the calibration length would be caught), for
every output. A failure is an error: a wrong model is never written.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.instrument import masked_model
from optin_onnx.probe import sample_feeds, sequence_inputs
from optin_onnx.runtime import session


@dataclass
class VerifyResult:
    max_abs_err: float
    tolerance: float
    cases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "tolerance": self.tolerance,
                "cases": self.cases, "passed": self.passed}


def verify_cases(cal: CalibrationSet, seq_names: set[str]) -> list[tuple[int, int | None]]:
    """(batch, sequence) pairs: batch 1 and 3; the mean real length and 8 tokens longer than the
    longest calibration sample (no sequence axis: batch sizes only)."""
    if not seq_names & set(cal.feeds):
        return [(1, None), (3, None)]
    longest = max(cal.feeds[k].shape[1] for k in seq_names & set(cal.feeds))
    short = max(1, int(round(cal.mean_length)))
    return [(b, s) for b in (1, 3) for s in (short, longest + 8)]


def verify(dense: ir.Model, slim: onnx.ModelProto, structure: Structure,
           keep: Mapping[str, Sequence[int]], cal: CalibrationSet, tolerance: float = 1e-4,
           providers: Sequence[str] | None = None) -> VerifyResult:
    masks = {}
    for b in structure.blocks:
        m = np.zeros(b.n_units, dtype=np.float32)
        m[list(keep.get(b.name, range(b.n_units)))] = 1.0
        masks[b.name] = m
    reference = session(ir.to_proto(masked_model(dense, structure, masks)), providers)
    candidate = session(slim, providers)
    result = VerifyResult(0.0, tolerance)
    for batch, seq in verify_cases(cal, sequence_inputs(dense)):
        feeds = sample_feeds(cal.feeds, batch, seq, sequence_inputs(dense))
        want = reference.run(None, feeds)
        got = candidate.run(None, feeds)
        err = max(float(np.max(np.abs(w.astype(np.float64) - g))) if w.size else 0.0
                  for w, g in zip(want, got))
        result.max_abs_err = max(result.max_abs_err, err)
        result.cases.append(f"{batch}x{seq}" if seq else f"{batch}")
    return result
