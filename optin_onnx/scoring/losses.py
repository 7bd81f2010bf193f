"""The two halves of OPTIN's trajectory loss.

L_MD (manifold distillation): L2-normalise every token's feature vector, take K tokens (drawn once
with a fixed seed, padding excluded), and sum the squared differences of the teacher's and the
student's K x K cosine-similarity Gram matrices. L_KD: KL(teacher || student) of the softmaxed
logits; embedding outputs use 1 - cosine instead, token outputs use L_MD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optin_onnx.metrics import cosine_similarity, kl_divergence


def rows(feature: np.ndarray) -> np.ndarray:
    """Token rows of a feature map: every leading axis flattened ([B, S, H] and the [B*S, H] of a
    Gemm-form export give the same (sample, position) row order)."""
    return feature.reshape(-1, feature.shape[-1])


def normalised_gram(token_rows: np.ndarray) -> np.ndarray:
    """K x K cosine similarities, float32 (the features are float32 already, and the product is
    a large share of the scoring time). Each row's norm is accumulated in float64."""
    x = token_rows.astype(np.float32, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    f = x * (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)[:, None]
    return f @ f.T


def md_loss(teacher_gram: np.ndarray, student_rows: np.ndarray) -> float:
    """Sum of squared differences of the two Gram matrices. The difference is taken in float32,
    in place: both matrices are float32 and close to each other, so the subtraction is exact
    where it matters (Sterbenz), and a float64 copy of K x K matrices cost as much as the product
    (docs/RESULTS.md, "One-off measurements"). The squares are summed in float64."""
    diff = normalised_gram(student_rows)
    diff -= teacher_gram
    np.square(diff, out=diff)
    return float(diff.sum(dtype=np.float64))


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
