"""One batched inference helper for every benchmark (text feeds and image batches alike)."""
from __future__ import annotations

import numpy as np
import onnx


def outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """The first output of ``proto`` on ``feeds`` (arrays per graph input, first axis = sample),
    run ``batch`` samples at a time; arrays the graph does not take are ignored."""
    from optin_onnx.runtime import session

    sess = session(proto)
    names = {i.name for i in sess.get_inputs()}
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()
                                           if k in names})[0] for i in range(0, n, batch)])
