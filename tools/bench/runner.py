"""One batched inference helper for every benchmark (text feeds and image batches alike)."""
from __future__ import annotations

import numpy as np
import onnx


def outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """The first output of ``proto`` on ``feeds`` (arrays per graph input, first axis = sample),
    run ``batch`` samples at a time; arrays the graph does not take are ignored
    (:func:`optin_onnx.runtime.run_batched`, the package's own batched runner)."""
    from optin_onnx.runtime import run_batched

    return run_batched(proto, feeds, batch)
