"""What every method of a benchmark run shares: the package's own *prepare* stage
(:mod:`optin_onnx.stages.prepare`, what ``optin_onnx.prune`` runs first), scoring on every
calibration sample the target gives (each target cuts its calibration set to size)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the package loads when a run starts
    from optin_onnx.stages.prepare import Prepared


def prepare(path: Path | str, calib: dict[str, np.ndarray],
            held: dict[str, np.ndarray] | None = None) -> Prepared:
    """Load and analyse ``path``, build the scoring set from all of ``calib`` and count MACs at
    its mean real length (images: at their own size), as ``prune`` does by default; ``held``:
    the held-out samples the refit checks its fits on (``Prepared.held``)."""
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.options import PruneOptions
    from optin_onnx.stages.prepare import prepare as prepare_stage

    samples = len(next(iter(calib.values())))
    prep = prepare_stage(path, calib, PruneOptions(samples=samples))
    if not held:
        return prep
    # Encoded on their own (texts are padded to their batch's longest row), so not a slice of
    # ``calib``: the held-out set replaces the stage's (there is none after all of ``calib``).
    return dataclasses.replace(prep, held=make_calibration(held, prep.chunking.chunk_size),
                               has_held=True)
