"""Shared test helpers: run a model in onnxruntime, make token inputs for the tiny encoders."""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optin_onnx.analysis import Structure

#: Vocabulary of ``models.text_encoders.tiny_bert()``: token ids are drawn from [1, VOCAB).
VOCAB = 100

#: The keys of the ``tiny_exports`` fixture (conftest.py): (exporter, head, simplified).
EXPORTERS = ("torchscript", "dynamo")
HEADS = ("none", "classifier", "pool")
FORMS = list(itertools.product(EXPORTERS, HEADS, (False, True)))


def form_id(form) -> str:
    """A readable pytest id for a ``tiny_exports`` key, e.g. ``dynamo-pool-sim``."""
    exporter, head, simplified = form
    return f"{exporter}-{head}" + ("-sim" if simplified else "")


def _serialized(model) -> bytes:
    if isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    raise TypeError(f"cannot run a {type(model).__name__}")


def run(model, feeds: Mapping[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """Run ``model`` (an ``ir.Model``, ``onnx.ModelProto``, serialized bytes or a path) on CPU and
    return its outputs, in graph-output order.

    Feeds the model does not declare as inputs are ignored, so one feed dict serves every variant
    of a model (dense, masked, sliced). ``optimize=False`` turns onnxruntime's graph optimisations
    off: its shape-dependent fusions (which differ once recorded intermediate shapes are gone) then
    cannot move results by float rounding, so equal graphs give bit-equal outputs.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(_serialized(model), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def tiny_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token inputs for the tiny BERT exports: ``input_ids`` in [1, 100), an ``attention_mask``
    with padding (row 0 is full length, every other row is padded to a random length of at least
    half the sequence; a single row is padded too when ``seq`` >= 4), ``token_type_ids`` zeros."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(max(1, (seq + 1) // 2), max(2, seq), size=batch)
    if batch > 1:
        lengths[0] = seq
    elif seq < 4:
        lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def load_analyze(model) -> tuple[ir.Model, Structure]:
    """Load a path or ``onnx.ModelProto`` as the pipeline does (unique node names) and analyse it
    at the probe's shapes."""
    from optin_onnx import analysis, graph, probe

    m = graph.normalize(ir.from_proto(model) if isinstance(model, onnx.ModelProto)
                        else ir.load(str(model)))
    return m, analysis.analyze_graph(m, probe.probe(m))


def zoo_exports(root, arch: str, attention: str = "default"):
    """``get(exporter) -> (ZooModel, path)``: the zoo architecture ``arch`` exported under
    ``root`` on first use per exporter (a module fixture keeps one per test file)."""
    import warnings

    from models import zoo

    done = {}

    def get(exporter: str):
        if exporter not in done:
            zm = zoo.ZOO[arch](attention)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                done[exporter] = zm, zoo.export(zm, root / f"{arch}-{exporter}.onnx", exporter)
        return done[exporter]
    return get
