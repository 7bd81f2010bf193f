"""Stage *calibrate*: run the dense model in onnxruntime and keep the activations scoring needs.

The calibration set is processed in chunks of samples; each chunk is cut to its longest real
sequence (trailing all-padding columns change nothing a mask can see), which saves work on short
texts. Which axis of each captured tensor is the batch axis is *measured* (two probe runs at
different batch sizes), so candidates can later be stacked along it whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from optin_onnx import runtime
from optin_onnx.errors import OptinError

MASK_INPUT = "attention_mask"


@dataclass
class Chunk:
    start: int
    stop: int
    feeds: dict[str, np.ndarray]

    @property
    def seq_len(self) -> int:
        return next(iter(self.feeds.values())).shape[1] if self.feeds else 0


@dataclass
class CalibrationSet:
    """Calibration inputs (first axis = sample) and which token positions are real."""

    feeds: dict[str, np.ndarray]
    token_mask: np.ndarray  # [N, S] bool
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.token_mask.shape[0]

    @property
    def mean_length(self) -> float:
        return float(self.token_mask.sum(1).mean())


def make_calibration(feeds: dict[str, np.ndarray], chunk_size: int = 16) -> CalibrationSet:
    """Wrap calibration arrays; an ``attention_mask`` input (if any) marks padding."""
    n = {a.shape[0] for a in feeds.values()}
    if len(n) != 1:
        raise OptinError(f"calibration arrays disagree on the number of samples: {sorted(n)}")
    n_samples = n.pop()
    mask = feeds.get(MASK_INPUT)
    seq_inputs = [k for k, a in feeds.items() if a.ndim >= 2 and mask is not None
                  and a.shape[:2] == mask.shape[:2]]
    if mask is not None:
        token_mask = mask.astype(bool)
    else:
        first = next(iter(feeds.values()))
        token_mask = np.ones(first.shape[:2] if first.ndim >= 2 else (n_samples, 1), dtype=bool)
    cal = CalibrationSet(feeds, token_mask)
    for start in range(0, n_samples, chunk_size):
        stop = min(start + chunk_size, n_samples)
        chunk = {k: a[start:stop] for k, a in feeds.items()}
        if mask is not None and len(seq_inputs) == len(feeds):
            length = max(1, int(token_mask[start:stop].sum(1).max()))
            length = max(length, int(np.max(np.nonzero(token_mask[start:stop].any(0))[0]) + 1))
            chunk = {k: np.ascontiguousarray(a[:, :length]) for k, a in chunk.items()}
        cal.chunks.append(Chunk(start, stop, chunk))
    return cal


def subset(cal: CalibrationSet, index: np.ndarray, chunk_size: int = 16) -> CalibrationSet:
    return make_calibration({k: a[index] for k, a in cal.feeds.items()}, chunk_size)


def capture(model: onnx.ModelProto, cal: CalibrationSet, names: list[str],
            providers: list[str] | None = None, extra: dict[str, np.ndarray] | None = None
            ) -> list[dict[str, np.ndarray]]:
    """Dense activations ``names`` for every chunk of the calibration set (``extra``: inputs
    that are not calibration data, such as all-ones masks, fed to every chunk)."""
    sess = runtime.session(model, providers, outputs=names)
    out = []
    for chunk in cal.chunks:
        values = sess.run(names, {**chunk.feeds, **(extra or {})})
        out.append(dict(zip(names, values)))
    return out


def batch_axes(model: onnx.ModelProto, cal: CalibrationSet, names: list[str]) -> dict[str, int | None]:
    """For each value, the axis that grows with the batch (None: batch-independent).

    Measured with two runs (1 and 2 samples of the first chunk) instead of assumed to be axis 0.
    """
    chunk = cal.chunks[0].feeds
    take = {k: np.concatenate([a[:1], a[:1]]) for k, a in chunk.items()}
    one = runtime.run_all_values(model, {k: a[:1] for k, a in chunk.items()}, names=names)
    two = runtime.run_all_values(model, take, names=names)
    axes: dict[str, int | None] = {}
    for name in names:
        s1, s2 = np.shape(one[name]), np.shape(two[name])
        diff = [i for i, (a, b) in enumerate(zip(s1, s2)) if a != b]
        if len(diff) > 1 or len(s1) != len(s2):
            raise OptinError(f"cannot tell the batch axis of '{name}' ({s1} vs {s2})")
        axes[name] = diff[0] if diff else None
    return axes
