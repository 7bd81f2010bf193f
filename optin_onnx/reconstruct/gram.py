"""Streamed normal equations and the damped least-squares solve of the refit.

A refit needs only A^T A, A^T T and the sum of squares of T (A: the rows a layer reads, T: what it
should produce), so the activations are added chunk by chunk and never held all at once; the
accumulators are float64 because A^T A of a few thousand tokens in float32 loses the small
eigenvalues that decide a ridge solution. The same accumulators over held-out rows give the exact
held-out squared error of any candidate weight, which is what the guard compares.
"""
from __future__ import annotations

import numpy as np


class Gram:
    """A^T A, A^T T, sum(T^2) and the row count of a least-squares problem A W ~ T, in float64."""

    def __init__(self, k: int, n: int) -> None:
        self.aa = np.zeros((k, k))
        self.at = np.zeros((k, n))
        self.tt = 0.0
        self.rows = 0

    def add(self, a: np.ndarray, t: np.ndarray) -> None:
        """Accumulate rows ``a`` [r, k] with their targets ``t`` [r, n]."""
        a = np.asarray(a, np.float64)
        t = np.asarray(t, np.float64)
        self.aa += a.T @ a
        self.at += a.T @ t
        self.tt += float(np.sum(t * t))
        self.rows += a.shape[0]

    @property
    def nbytes(self) -> int:
        return self.aa.nbytes + self.at.nbytes

    def error(self, w: np.ndarray) -> float:
        """||A W - T||^2 over the accumulated rows, from the accumulators alone."""
        return float(np.sum(w * (self.aa @ w)) - 2.0 * np.sum(w * self.at) + self.tt)


def solve_spd(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``lhs^-1 rhs`` for a symmetric positive (semi-)definite ``lhs``: one LU solve, and a
    least-squares solve where the matrix is singular (a unit that never fires on the calibration
    rows, with no damping on it). Not Cholesky: numpy has no triangular solve, so a Cholesky
    factor would be followed by two general solves, 2.5 times the work of one, and the refit
    solves once per damping and block (the demo model's profile: docs/RESULTS.md, "Weight
    refit")."""
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def ridge(gram: Gram, w0: np.ndarray, damping: float, free: int = 0) -> np.ndarray:
    """argmin_W ||A W - T||^2 + lam ||W - W0||^2 over all rows of W but the last ``free`` (a bias
    row, left unpenalised), with lam = ``damping`` times the mean diagonal of the penalised part
    of A^T A: relative, so one damping means the same for every layer whatever its activation
    scale."""
    k = gram.aa.shape[0]
    pen = np.ones(k)
    pen[k - free:] = 0.0
    diag = np.diag(gram.aa)[pen > 0]
    scale = float(np.mean(diag)) if diag.size and np.mean(diag) > 0 else 1.0
    lam = damping * scale
    lhs = gram.aa + lam * np.diag(pen)
    rhs = gram.at + lam * pen[:, None] * w0
    return solve_spd(lhs, rhs)
