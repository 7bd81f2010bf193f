"""Stage *canonicalize*: run-time Reshape targets become constants only where that is provably the
same computation, dynamic axes stay dynamic, and the shape-computing nodes disappear."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx.analysis import analyze_graph
from optin_onnx.passes.canonicalize_reshapes import canonicalize_reshapes
from optin_onnx.graph import copy_model, normalize
from optin_onnx.probe import dummy_feeds, probe
from optin_onnx.rewrite import rewrite
from tests.helpers import FORMS, form_id, run, tiny_feeds


def _probes(m):
    return [probe(m, dummy_feeds(m, batch=b, seq=s)) for b, s in ((3, 11), (2, 7))]


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_canonical_targets_compute_the_same_at_every_size(tiny_exports, form):
    m = normalize(ir.load(tiny_exports[form]))
    s = analyze_graph(m, probe(m))
    slim = rewrite(m, s, {b.name: list(range(0, b.n_units, 2)) for b in s.blocks})
    canon = copy_model(slim)
    n = canonicalize_reshapes(canon, _probes(canon))
    reshapes = [x for x in canon.graph if x.op_type == "Reshape"]
    if form[0] == "torchscript" and not form[2]:
        assert n >= 8, "every head split/merge of the TorchScript export is a run-time Concat"
    if n:
        assert len(list(canon.graph)) < len(list(slim.graph))
        assert sum(x.inputs[1].const_value is not None for x in reshapes) >= n
    for batch, seq in ((1, 5), (4, 33)):
        feeds = tiny_feeds(batch, seq, seed=batch)
        for a, b in zip(run(slim, feeds), run(canon, feeds)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-6)
    for v in canon.graph.inputs:
        assert not all(isinstance(d, int) for d in v.shape), "dynamic axes must stay dynamic"


def test_a_target_not_tied_to_the_input_dims_is_left_alone(tiny_exports):
    """The attention-mask Reshape of the TorchScript export takes its target from another tensor's
    Shape, and its input is 1-D: element k is not "copy input dim k", so it must stay run-time,
    while the head splits become constants."""
    m = normalize(ir.load(tiny_exports[("torchscript", "none", False)]))
    canon = copy_model(m)
    canonicalize_reshapes(canon, _probes(canon))
    nodes = {n.name: n for n in canon.graph}
    mask_reshape = nodes["/bert/Reshape_1"]
    assert mask_reshape.inputs[1].const_value is None
    assert mask_reshape.inputs[1].producer().op_type == "Concat"  # Concat(Shape(...))
    split = nodes["/bert/encoder/layer.0/attention/self/Reshape"]
    assert split.inputs[1].const_value.numpy().tolist() == [0, 0, 4, 8]  # the head count written


@pytest.mark.parametrize("form", [f for f in FORMS if not f[2]], ids=form_id)
def test_pruned_head_counts_are_written_into_the_head_splits(tiny_exports, form):
    """After pruning, each head split's target holds its layer's head count as a constant
    element (never -1: onnxruntime's attention fusion reads the count there), in both exporters'
    forms (the dynamo exporter's allowzero=1 targets included). Not in onnxsim's Gemm form,
    where the target does not copy its input's dims (and onnxruntime's fusion does not apply)."""
    from optin_onnx.analysis.shapes import ConstElement, trace_element

    m = normalize(ir.load(tiny_exports[form]))
    s = analyze_graph(m, probe(m))
    keep = {b.name: list(range(b.n_units - 1 - i)) for i, b in enumerate(s.blocks)}
    slim = rewrite(m, s, keep)
    canonicalize_reshapes(slim, _probes(slim))
    values = probe(slim)
    counts = set()
    for node in slim.graph:
        out = values.get(node.outputs[0].name)
        if node.op_type != "Reshape" or out is None or out.ndim != 4 or out.shape[-1] != 8:
            continue
        axis = 2 if out.shape[2] <= 4 else 1  # [B, S, H, 8] or [B, H, S, 8]
        element = trace_element(node.inputs[1], axis, values)
        assert isinstance(element, ConstElement) and element.value == out.shape[axis], node.name
        counts.add(element.value)
    assert counts == {len(v) for b, v in zip(s.blocks, keep.values()) if b.kind == "attention"}


def test_pruned_model_fuses_attention_in_onnxruntime_with_per_layer_heads(tiny_eager_export):
    """What the explicit head counts are for: ``prune``'s output, layers left with different head
    counts, goes through onnxruntime's BERT fusion with every layer fused into Attention (of the
    eager export: onnxruntime's optimizer leaves transformers' default SDPA form unfused)."""
    from optin_onnx.pipeline import prune
    from tools.bench_fusion import fuse

    result = prune(tiny_eager_export("none"), tiny_feeds(24, 16), flops=0.6,
                   latency_cases=(), simplify="off")
    heads = [len(v) for k, v in result.selection.keep.items() if k.endswith("attention")]
    assert len(set(heads)) > 1  # the point: per-layer head counts differ
    fused = fuse(result.model, 0, 0)
    assert [n.op_type for n in fused.graph.node].count("Attention") == len(heads)
    feeds = tiny_feeds(2, 9, seed=1)
    for a, b in zip(run(result.model, feeds), run(fused, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-4)
