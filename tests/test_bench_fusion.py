"""tools/bench_fusion.py: onnxruntime's attention fusion on a pruned tiny BERT whose layers keep
different head counts."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from tests.helpers import run, tiny_feeds

bf = pytest.importorskip("tools.bench_fusion")
pytest.importorskip("onnxruntime.transformers.optimizer")


@pytest.fixture(scope="module")
def pruned(tiny_eager_export) -> onnx.ModelProto:
    """The tiny eager TorchScript classifier (the form onnxruntime fuses into ``Attention``) with
    3 heads kept in layer 0, 2 in layer 1, half the FFN, its Reshape targets made constant as
    ``optin-onnx prune`` leaves them."""
    from optin_onnx.analysis import analyze_graph
    from optin_onnx.passes.canonicalize_reshapes import canonicalize_reshapes
    from optin_onnx.probe import dummy_feeds, probe
    from optin_onnx.rewrite import rewrite

    m = ir.load(str(tiny_eager_export("classifier")))
    structure = analyze_graph(m, probe(m))
    keep = {b.name: list(range(3 - b.layer)) if b.kind == "attention"
            else list(range(0, b.n_units, 2)) for b in structure.blocks}
    slim = rewrite(m, structure, keep)
    canonicalize_reshapes(slim, [probe(slim, dummy_feeds(slim, batch=b, seq=s))
                                 for b, s in ((3, 11), (2, 7))])
    return ir.to_proto(slim)


def _implicit(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with -1 for the head count in every head split (as exporters write it)."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = {n.input[1] for n in out.graph.node if n.op_type == "Reshape"}
    for t in out.graph.initializer:
        arr = numpy_helper.to_array(t)
        if t.name in targets and arr.shape == (4,) and arr[3] == 8:
            t.CopyFrom(numpy_helper.from_array(np.array([arr[0], arr[1], -1, 8]), t.name))
    return out


def test_prune_output_fuses_every_layer_with_its_own_heads(pruned):
    """canonicalize already wrote each layer's head count: nothing left for the tool to do."""
    explicit = onnx.ModelProto()
    explicit.CopyFrom(pruned)
    assert bf.explicit_head_counts(explicit) == 0
    feeds = tiny_feeds(3, 12)
    fused = bf.fuse(explicit, 0, 0)
    counts = bf.fused_counts(fused)
    assert counts["Attention"] == 2 and bf._heads(fused) == [3, 2]
    assert counts["SkipLayerNormalization"] == 4 and counts["nodes"] < len(pruned.graph.node)
    np.testing.assert_allclose(run(fused, feeds)[0], run(pruned, feeds)[0], atol=1e-5)


def test_explicit_head_counts_repair_a_model_with_implicit_heads(pruned):
    implicit = _implicit(pruned)
    assert bf.fused_counts(bf.fuse(implicit, 0, 0))["Attention"] == 0
    assert bf.explicit_head_counts(implicit) == 6  # Q, K, V reshapes of 2 layers
    feeds = tiny_feeds(3, 12)
    np.testing.assert_allclose(run(implicit, feeds)[0], run(pruned, feeds)[0], atol=1e-6)
    assert bf.fused_counts(bf.fuse(implicit, 0, 0))["Attention"] == 2


def test_fusion_table_lists_heads_and_fused_types():
    entry = {"fused_nodes": {**{k: 0 for k in bf.FUSED}, "Attention": 2, "nodes": 30},
             "unfused_nodes": 90, "attention_heads": [3, 2], "fused_max_abs_diff": 2e-7,
             "flops_kept": 0.6}
    table = bf.fusion_table({"levels": {"0.6": entry}})
    assert "| 0.6 | 0.600 | 3, 2 | 2 | 90 -> 30 | 2e-07 |" in table
    assert "BiasGelu" not in table  # types that never fused get no column
