"""The two halves of OPTIN's trajectory loss.

L_MD (manifold distillation): L2-normalise every token's feature vector, take K tokens (drawn once
with a fixed seed, padding excluded), and sum the squared differences of the teacher's and the
student's K x K cosine-similarity Gram matrices. L_KD: KL(teacher || student) of the softmaxed
logits; embedding outputs use 1 - cosine instead, token outputs use L_MD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optin_onnx.errors import OptinError


def rows(feature: np.ndarray) -> np.ndarray:
    """Token rows of a feature map: every leading axis flattened ([B, S, H] and the [B*S, H] of a
    Gemm-form export give the same (sample, position) row order)."""
    return feature.reshape(-1, feature.shape[-1])


def normalised_gram(token_rows: np.ndarray) -> np.ndarray:
    """K x K cosine similarities. The product runs in float32 (the features are float32 already;
    this is a tenth of the scoring time in float64), the norms in float64."""
    f = token_rows.astype(np.float64)
    f = (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return f @ f.T


def md_loss(teacher_gram: np.ndarray, student_rows: np.ndarray) -> float:
    diff = normalised_gram(student_rows).astype(np.float64) - teacher_gram
    return float(np.sum(diff * diff))


def kl_divergence(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(softmax(teacher) || softmax(student)) over every sample, in nats.

    Classes are on the last axis; all leading axes (batch, and tokens for per-token logits) are
    samples. Computed with log-softmax in float64 so large logits neither overflow nor lose the small
    differences a good prune leaves.
    """
    t, s = as_pair(teacher_logits, student_logits, "kl_divergence")
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
    x, y = as_pair(a, b, "cosine_similarity")
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


def as_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise OptinError(f"{what} needs two non-empty arrays of one shape, got {x.shape} and {y.shape}")
    return x, y


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def kl_loss(teacher: np.ndarray, student: np.ndarray) -> float:
    """L_KD for logits: mean KL(softmax(teacher) || softmax(student))."""
    return kl_divergence(teacher, student)


def cosine_loss(teacher: np.ndarray, student: np.ndarray) -> float:
    """L_KD for embeddings: mean 1 - cos(teacher, student)."""
    return 1.0 - cosine_similarity(teacher, student)





@dataclass(frozen=True)
class TokenSample:
    """K token positions drawn once, shared by every feature and every candidate.

    ``sample``/``position`` index the calibration set; rows inside a chunk are found with
    :meth:`rows_in_chunk`.
    """

    sample: np.ndarray
    position: np.ndarray

    @staticmethod
    def draw(token_mask: np.ndarray, k: int, seed: int) -> "TokenSample":
        """``token_mask`` [N, S]: True at real (non-padding) tokens."""
        idx = np.flatnonzero(token_mask.reshape(-1))
        rng = np.random.default_rng(seed)
        if idx.size > k:
            idx = np.sort(rng.choice(idx, size=k, replace=False))
        s = token_mask.shape[1]
        return TokenSample(idx // s, idx % s)

    def rows_in_chunk(self, start: int, stop: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(which of the K tokens fall in samples [start, stop), their row in that chunk's map)."""
        sel = np.flatnonzero((self.sample >= start) & (self.sample < stop))
        return sel, (self.sample[sel] - start) * seq_len + self.position[sel]
