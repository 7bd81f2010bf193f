"""Stage *canonicalize*: run-time Reshape targets become constants only where that is provably the
same computation, dynamic axes stay dynamic, and the shape-computing nodes disappear."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx.analysis import analyze_graph
from optin_onnx.canonicalize import canonicalize_reshapes
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
    assert split.inputs[1].const_value.numpy().tolist() == [0, 0, -1, 8]
