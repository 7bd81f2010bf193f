"""Reference topic classifier: frozen all-MiniLM-L6-v2 + mean pooling + a linear head on BBC News.

The head is fitted once, with numpy, on the dense model's pooled embeddings of the training split,
and loaded into :class:`models.text_encoders.EncoderWrapper`'s ``Linear`` so that the exported
graph computes ``input_ids, attention_mask, token_type_ids -> logits [B, 5]`` in one piece (the
pruner sees and prunes the whole thing; accuracy is the logits' argmax against the labels).

Splits are positions in the ``bbc_news(seed)`` ordering (:mod:`models.corpora`), fixed by the seed:

* ``test``  - the last ``n_test`` (600) articles: held out, touched by nothing else in the repo
  (the demo and benchmarks calibrate on the first few dozen of the same ordering);
* ``train`` - everything before that: fits the head;
* ``calib`` - the first ``n_calib`` (64) of ``train``: what pruning calibrates on.

    python -m models.build bbc-classifier out/bbc_classifier.onnx
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from models.cache import attention_tag

BBC_SEED = 0
BBC_N_TEST = 600
BBC_N_CALIB = 64


# ---------------------------------------------------------------------------------------------
# Splits


def seeded_splits(n: int, n_test: int, n_calib: int) -> dict[str, list[int]]:
    """Positions ``0..n-1`` (already a seeded permutation) cut into train / calib / test.

    ``test`` is the tail, ``train`` the rest, ``calib`` the head of ``train``. Disjoint test and
    train; ``calib`` is a subset of ``train``.
    """
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in (0, {n}) (got {n_test})")
    n_train = n - n_test
    if not 0 < n_calib <= n_train:
        raise ValueError(f"n_calib must be in (0, {n_train}] (got {n_calib})")
    return {"train": list(range(n_train)), "calib": list(range(n_calib)),
            "test": list(range(n_train, n))}


def bbc_splits(seed: int = BBC_SEED, n_test: int = BBC_N_TEST,
               n_calib: int = BBC_N_CALIB) -> dict[str, list[int]]:
    """Split positions into ``models.corpora.bbc_news(seed)``."""
    from models.corpora import bbc_news

    return seeded_splits(len(bbc_news(seed)), n_test, n_calib)


def bbc_split_data(seed: int = BBC_SEED, n_test: int = BBC_N_TEST, n_calib: int = BBC_N_CALIB
                   ) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (texts, int64 labels)}``; label ids index :func:`models.corpora.bbc_labels`."""
    from models.corpora import bbc_labels, bbc_news

    items = bbc_news(seed)
    ids = {name: i for i, name in enumerate(bbc_labels())}
    out = {}
    for split, pos in bbc_splits(seed, n_test, n_calib).items():
        out[split] = ([items[p][0] for p in pos],
                      np.array([ids[items[p][1]] for p in pos], dtype=np.int64))
    return out


# ---------------------------------------------------------------------------------------------
# Linear heads (numpy only)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    return (x - mu) / sd, mu, sd


def _fold(w: np.ndarray, b: np.ndarray, mu: np.ndarray, sd: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """``w @ ((x - mu) / sd) + b`` as ``w' @ x + b'`` (weights shaped ``[C, D]`` like nn.Linear)."""
    w2 = w / sd[None, :]
    return w2, b - w2 @ mu


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-3,
                 steps: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent (Nesterov momentum) on
    standardised features, with L2 on the weights. Returns ``(W [C, D], b [C])`` for raw ``x``.

    The step is ``1 / L`` with ``L = lambda_max(X'X / n) / 2 + l2`` (a bound on the curvature of
    the softmax cross-entropy), so it cannot diverge however correlated the features are."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    xs, mu, sd = _standardise(x)
    n, d = xs.shape
    onehot = np.eye(num_classes)[y]
    w = np.zeros((num_classes, d))
    b = np.zeros(num_classes)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    lip = 0.5 * max(float(np.linalg.eigvalsh(xs.T @ xs / n)[-1]), 1.0) + l2
    lr = 1.0 / lip
    beta = 0.9
    for _ in range(steps):
        wl, bl = w + beta * vw, b + beta * vb  # look-ahead point
        z = xs @ wl.T + bl
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        gw = g.T @ xs + l2 * wl
        gb = g.sum(0)
        vw = beta * vw - lr * gw
        vb = beta * vb - lr * gb
        w, b = w + vw, b + vb
    w2, b2 = _fold(w, b, mu, sd)
    return w2.astype(np.float32), b2.astype(np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression onto one-hot targets (centred, standardised features)."""
    x = np.asarray(x, dtype=np.float64)
    xs, mu, sd = _standardise(x)
    t = np.eye(num_classes)[np.asarray(y, dtype=np.int64)]
    tm = t.mean(0)
    a = xs.T @ xs + l2 * np.eye(xs.shape[1])
    w = np.linalg.solve(a, xs.T @ (t - tm)).T
    w2, b2 = _fold(w, tm, mu, sd)
    return w2.astype(np.float32), b2.astype(np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(y)).mean())


HEADS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "logistic": fit_logistic, "ridge": fit_ridge}


# ---------------------------------------------------------------------------------------------
# Embedding and export


def _batches(texts: Sequence[str], size: int):
    for i in range(0, len(texts), size):
        yield texts[i:i + size]


def pooled_embeddings(wrapper, texts: Sequence[str], max_length: int = 128, batch: int = 32,
                      log: Callable[[str], None] | None = None) -> np.ndarray:
    """Masked-mean-pooled last hidden states ``[N, H]`` of an ``EncoderWrapper(head="classifier")``
    (the exact tensor its ``classifier`` Linear reads), computed by its own forward."""
    import torch

    from models.text_encoders import minilm_dir
    from optin_onnx.calibdata import encode_texts

    saved = wrapper.classifier
    wrapper.classifier = torch.nn.Identity()
    out = []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for k, chunk in enumerate(_batches(list(texts), batch)):
                arr = encode_texts(chunk, minilm_dir(), max_length=max_length)
                out.append(wrapper(**{n: torch.from_numpy(a) for n, a in arr.items()}).numpy())
                if log and (k + 1) % 10 == 0:
                    log(f"  embedded {(k + 1) * batch}/{len(texts)} "
                        f"({time.perf_counter() - t0:.0f}s)")
    finally:
        wrapper.classifier = saved
    return np.concatenate(out).astype(np.float32)


def onnx_logits(path: str | Path, texts: Sequence[str], max_length: int, batch: int = 32
                ) -> np.ndarray:
    """Run an exported classifier with onnxruntime (CPU) on ``texts``."""
    from models.text_encoders import minilm_dir
    from optin_onnx.calibdata import encode_texts
    from optin_onnx.runtime import first_output, session

    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    return first_output(sess, (encode_texts(chunk, minilm_dir(), max_length=max_length,
                                            input_names=names)
                               for chunk in _batches(list(texts), batch)))


def build_bbc_classifier(out_path: str | Path, max_length: int = 128, head: str = "logistic",
                         seed: int = BBC_SEED, exporter: str = "torchscript",
                         attention: str | None = None,
                         log: Callable[[str], None] | None = print) -> dict:
    """Fit the BBC topic head on the dense MiniLM's embeddings, export one ONNX graph with logits.

    Returns (and writes next to ``out_path`` as ``<name>.json``) the dense test accuracy measured
    through the exported graph with onnxruntime, the train accuracy, the head kind, timings, the
    class names and the split positions into ``bbc_news(seed)``. ``attention``: as
    :func:`models.text_encoders.load_minilm`.
    """
    import torch

    from models.corpora import bbc_labels
    from models.text_encoders import EncoderWrapper, export, load_minilm

    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)} (got {head!r})")
    log = log or (lambda s: None)
    out_path = Path(out_path)
    t0 = time.perf_counter()
    labels = bbc_labels()
    data = bbc_split_data(seed)
    wrapper = EncoderWrapper(load_minilm(attention), "classifier", num_labels=len(labels))
    train_texts, y_train = data["train"]
    log(f"embedding {len(train_texts)} training articles (max_length {max_length})")
    x_train = pooled_embeddings(wrapper, train_texts, max_length, log=log)
    t_embed = time.perf_counter() - t0

    w, b = HEADS[head](x_train, y_train, len(labels))
    train_acc = accuracy(x_train @ w.T + b, y_train)
    with torch.no_grad():
        wrapper.classifier.weight.copy_(torch.from_numpy(w))
        wrapper.classifier.bias.copy_(torch.from_numpy(b))
    export(wrapper, out_path, exporter=exporter)  # type: ignore[arg-type]

    test_texts, y_test = data["test"]
    log(f"evaluating the exported graph on {len(test_texts)} held-out articles")
    t1 = time.perf_counter()
    logits = onnx_logits(out_path, test_texts, max_length)
    t_eval = time.perf_counter() - t1
    result = {
        "model": str(out_path), "attention": attention_tag(attention), "head": head,
        "max_length": max_length, "seed": seed,
        "labels": labels, "test_accuracy": accuracy(logits, y_test), "train_accuracy": train_acc,
        "n_train": len(y_train), "n_test": len(y_test),
        "majority_baseline": float(np.bincount(y_test).max() / len(y_test)),
        "seconds": {"embed_train": round(t_embed, 1), "eval_test": round(t_eval, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "splits": bbc_splits(seed),
    }
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def bbc_classifier(cache: str | None = None, max_length: int = 128,
                   attention: str | None = None) -> tuple[Path, dict]:
    """The cached BBC classifier (built on first use under ``models.cache.cache_dir()``) and its
    metadata."""
    from models.cache import cache_dir

    path = cache_dir(cache) / f"bbc_classifier_L{max_length}_{attention_tag(attention)}.onnx"
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        build_bbc_classifier(path, max_length=max_length, attention=attention)
    return path, json.loads(meta.read_text())
