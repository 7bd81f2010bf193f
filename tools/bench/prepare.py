"""What every method of a benchmark run shares: the package's own *prepare* stage
(:mod:`optin_onnx.stages.prepare`, what ``optin_onnx.prune`` runs first), scoring on every
calibration sample the target gives (each target cuts its calibration set to size)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the package loads when a run starts
    from optin_onnx.stages.prepare import Prepared


def prepare(path: Path | str, calib: dict[str, np.ndarray]) -> Prepared:
    """Load and analyse ``path``, build the scoring set from all of ``calib`` and count MACs at
    its mean real length (images: at their own size), as ``prune`` does by default."""
    from optin_onnx.options import PruneOptions
    from optin_onnx.stages.prepare import prepare as prepare_stage

    samples = len(next(iter(calib.values())))
    return prepare_stage(path, calib, PruneOptions(samples=samples))
