"""How far a pruned model's outputs are from the dense model's: classification metrics
(accuracy, agreement, top-5 agreement, KL) and embedding fidelity (cosine, neighbours kept)."""
from __future__ import annotations

import numpy as np

#: Neighbours compared per text by the embedding target's overlap metric.
NEIGHBOURS = 10


def neighbour_overlap(dense: np.ndarray, pruned: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean over texts of |top-k neighbours by dense cosine & top-k by pruned cosine| / k.

    Neighbours are the other texts of the same set (a text is never its own neighbour); this is
    what a retrieval index built from pruned embeddings would return differently.
    """
    if dense.shape != pruned.shape or dense.ndim != 2 or dense.shape[0] <= k:
        raise ValueError(f"need two [N, D] arrays of the same shape with N > {k}")

    def top(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = top(dense.astype(np.float64)), top(pruned.astype(np.float64))
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def embedding(out: np.ndarray, dense: np.ndarray) -> dict[str, float]:
    """Mean cosine to the dense embeddings and the overlap of nearest neighbours."""
    from optin_onnx.metrics import cosine_similarity

    return {"cosine": cosine_similarity(dense, out), "neighbour_overlap": neighbour_overlap(dense,
                                                                                         out)}


def classification(logits: np.ndarray, dense: np.ndarray, labels: np.ndarray | None,
                   top5: bool = False) -> dict[str, float]:
    """Agreement with the dense top-1 (and, with ``top5``, the dense top-1 among the pruned
    model's 5 best), KL to the dense logits, and accuracy where ``labels`` exist."""
    from optin_onnx.metrics import kl_divergence, top1_agreement

    top1 = dense.argmax(1)
    out = {"agreement": top1_agreement(dense, logits)}
    if top5:
        out["top5_agreement"] = float(np.mean([t in row for t, row in
                                               zip(top1, np.argsort(-logits, 1)[:, :5])]))
    out["kl_to_dense"] = kl_divergence(dense, logits)
    if labels is not None:
        out["accuracy"] = float((logits.argmax(1) == labels).mean())
    return out
