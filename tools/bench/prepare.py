"""What every method of a benchmark run shares: the dense model, its analysis, the calibration set
and the MAC model, built once per run (the same chain ``optin_onnx.pipeline.prune`` runs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the package loads when a run starts
    import onnx_ir as ir

    from optin_onnx.analysis import Structure
    from optin_onnx.calibrate import CalibrationSet
    from optin_onnx.flops import MacModel


@dataclass(frozen=True)
class Prepared:
    """``seq_len``: the sequence length MACs are counted at (0: the calibration arrays' shapes)."""

    model: ir.Model
    structure: Structure
    calib: dict[str, np.ndarray]
    cal: CalibrationSet
    seq_len: int
    macs: MacModel


def prepare(path: Path | str, calib: dict[str, np.ndarray], sequence: bool = True) -> Prepared:
    """Load and analyse ``path`` and build the scoring set from ``calib``; with ``sequence`` MACs
    are counted at the calibration's mean real length (what ``prune`` does by default)."""
    from optin_onnx.analysis import analyze_graph
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import mac_model
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import dummy_feeds, probe

    m = as_model(path)
    structure = analyze_graph(m, probe(m, dummy_feeds(m, like=calib)))
    cal = make_calibration(calib)
    seq_len = max(1, int(round(cal.mean_length))) if sequence else 0
    return Prepared(m, structure, calib, cal, seq_len,
                    mac_model(m, structure, seq_len, like=calib))
