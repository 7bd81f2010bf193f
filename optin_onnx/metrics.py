"""How far a pruned model's outputs are from the dense model's: one definition of each metric.

The pipeline's fidelity report, the scorers' output term (:mod:`optin_onnx.scoring.losses`), the
verify stage and the benchmarks all read these, so a figure in the report and the same figure in a
benchmark are computed the same way. Every metric works in float64, whatever the model's dtype.
"""
from __future__ import annotations

import numpy as np

from optin_onnx.errors import OptinError


def kl_divergence(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(softmax(teacher) || softmax(student)) over every sample, in nats.

    Classes are on the last axis; all leading axes (batch, and tokens for per-token logits) are
    samples. Computed with log-softmax in float64 so large logits neither overflow nor lose the small
    differences a good prune leaves.
    """
    t, s = _pair(teacher_logits, student_logits, "kl_divergence")
    log_p = _log_softmax(t)
    log_q = _log_softmax(s)
    per_sample = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    # KL is non-negative; rounding can leave -1e-17 for identical inputs.
    return float(np.mean(np.maximum(per_sample, 0.0)))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples (first axis) of the cosine between the flattened per-sample outputs.

    Suited to embedding and hidden-state outputs, where direction matters and scale does not. A 1-D
    input is one sample. Two all-zero vectors count as identical (1); one all-zero vector as
    unrelated (0).
    """
    x, y = _pair(a, b, "cosine_similarity")
    rows = x.shape[0] if x.ndim > 1 else 1
    x = x.reshape(rows, -1)
    y = y.reshape(rows, -1)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.sum(x * y, axis=1)
    both_zero = (nx == 0) & (ny == 0)
    denom = np.where((nx == 0) | (ny == 0), 1.0, nx * ny)
    cos = np.where(both_zero, 1.0, dot / denom)
    return float(np.mean(np.clip(cos, -1.0, 1.0)))


def top1_agreement(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Fraction of samples whose arg-max class (last axis) is the same in both models.

    The figure a classifier's user cares about: how often the pruned model changes the answer.
    """
    t, s = _pair(teacher_logits, student_logits, "top1_agreement")
    return float(np.mean(np.argmax(t, axis=-1) == np.argmax(s, axis=-1)))


def max_abs_error(want: np.ndarray, got: np.ndarray) -> float:
    """The largest element-wise difference (0 for empty outputs): what verification bounds, since
    a masked and a sliced graph must agree everywhere, not on average."""
    return float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise OptinError(f"{what} needs two non-empty arrays of one shape, got {x.shape} and {y.shape}")
    return x, y


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
