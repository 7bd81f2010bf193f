"""Session fixtures: the tiny BERT encoders, exported once per test session.

``tiny_exports`` maps (exporter, head, simplified) to the path of an ONNX file, for exporter in
("torchscript", "dynamo"), head in ("none", "classifier", "pool") and simplified in (False, True),
all with transformers' default attention (what users export). ``tiny_eager_export(head)`` is the
eager TorchScript export of the same encoder, for what needs eager attention: onnxruntime's
transformer optimizer fuses only that form into ``Attention``.
Each (exporter, head) is exported once (a second or three) and its onnxsim'd twin is made from that
file, so the whole set costs about 15 s on 2 cores, once. The files are read-only by convention:
tests load them and write their own copies elsewhere.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import EXPORTERS, HEADS


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[tuple[str, str, bool], Path]:
    """{(exporter, head, simplified): path} for every tiny BERT export form (see module doc)."""
    from models import text_encoders as te

    root = tmp_path_factory.mktemp("tiny_exports")
    out: dict[tuple[str, str, bool], Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exporter, head in itertools.product(EXPORTERS, HEADS):
            # Same seed for every form: the heads differ, the encoder weights do not.
            module = te.EncoderWrapper(te.tiny_bert(seed=0), head=head)
            raw = te.export(module, root / f"{exporter}_{head}.onnx", exporter=exporter)
            out[(exporter, head, False)] = raw
            out[(exporter, head, True)] = te.simplify(raw, root / f"{exporter}_{head}_sim.onnx")
    return out


@pytest.fixture(scope="session")
def tiny_eager_export(tmp_path_factory) -> Callable[[str], Path]:
    """``head -> path``: the eager-attention TorchScript export of ``tiny_exports``' encoder,
    exported on first request and kept for the session."""
    from models import text_encoders as te

    root = tmp_path_factory.mktemp("tiny_eager_exports")

    @functools.cache
    def export(head: str) -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = te.EncoderWrapper(te.tiny_bert(seed=0, attention="eager"), head=head)
            return te.export(module, root / f"torchscript_{head}_eager.onnx")

    return export
