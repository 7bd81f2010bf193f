"""Where built reference models live: one cache directory shared by ``models`` and ``tools``.

It sits in ``models`` (the lower layer) because the recipes build into it and the benchmarks only
read from it; kept in ``tools`` it made the two packages import each other.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_dir(override: str | None = None) -> Path:
    """``override``, else ``$OPTIN_CACHE``, else ``~/.cache/optin-onnx`` (created): reference
    models take minutes to build, so they are built on demand and kept outside the repository."""
    root = Path(override or os.environ.get("OPTIN_CACHE", Path.home() / ".cache" / "optin-onnx"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(filename: str, build: Callable[[Path], object], cache: str | None = None) -> Path:
    """``cache_dir(cache) / filename``, built by ``build(path)`` on first use."""
    path = cache_dir(cache) / filename
    if not path.exists():
        build(path)
    return path


def attention_tag(attention: str | None) -> str:
    """The part of a cached export's file name that says which attention implementation it was
    exported with (``None``: transformers' default), so that an export of one implementation is
    never reused for another: the graphs differ (an SDPA export reads the head size at run time
    and guards fully masked rows), and so may their analysis and speed."""
    return f"{attention or 'default'}-attn"
