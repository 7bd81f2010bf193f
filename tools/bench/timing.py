"""The machine-independent unit of the speed benchmarks: one dense forward pass.

The development machine is shared and its speed varies from day to day (the same dense MiniLM
forward took twice as long in one session as in another), so pipeline times are also given in
dense forwards of the calibration samples, timed in the same process just before the run.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def dense_forward_s(path: Path, feeds: Mapping[str, np.ndarray], repeats: int = 3) -> float:
    """Median seconds of ``repeats`` runs of ``feeds`` through the model at ``path`` (after one
    warm-up run), with onnxruntime's default session options."""
    from optin_onnx.runtime import session

    sess = session(str(path))
    sess.run(None, dict(feeds))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, dict(feeds))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
