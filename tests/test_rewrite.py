"""Stage *rewrite* on every tiny export form: the sliced graph computes exactly what the masked
dense graph computes, at any batch size and sequence length, and is a valid, smaller model."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optin_onnx import analysis, graph, instrument, probe, rewrite
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array
from tests.helpers import FORMS, form_id, run, tiny_feeds

SIZES = [(batch, seq) for batch in (1, 3) for seq in (5, 40)]  # 40: longer than export and probe


def load_analyze(path) -> tuple[ir.Model, analysis.Structure]:
    m = graph.normalize(ir.load(str(path)))
    return m, analysis.analyze_graph(m, probe.probe(m))


def unit_masks(s: analysis.Structure, keep) -> dict[str, np.ndarray]:
    return {b.name: np.isin(np.arange(b.n_units), keep[b.name]).astype(np.float32)
            for b in s.blocks if b.name in keep}


def io_dims(proto: onnx.ModelProto) -> list[tuple]:
    """(name, elem type, dims) of every graph input and output; dims as dim_param or dim_value."""
    def dims(vi):
        return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
    return [(vi.name, vi.type.tensor_type.elem_type, dims(vi))
            for vi in (*proto.graph.input, *proto.graph.output)]


def float_params(proto: onnx.ModelProto) -> tuple[int, int]:
    """(number, total elements) of floating-point initializers: the weights."""
    floats = [t for t in proto.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                 onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)]
    return len(floats), sum(int(np.prod(t.dims)) for t in floats)


def node_key(n: onnx.NodeProto) -> tuple:
    """A node as a comparable value; trailing omitted optional inputs ('') do not count."""
    inputs = list(n.input)
    while inputs and not inputs[-1]:
        inputs.pop()
    return (n.domain, n.op_type, n.name, tuple(inputs), tuple(n.output),
            tuple(sorted(a.SerializeToString() for a in n.attribute)))


def op_count(model: ir.Model, ops=("MatMul", "Gemm")) -> int:
    return sum(n.op_type in ops for n in model.graph)


def random_keep(s: analysis.Structure, seed: int) -> dict[str, list[int]]:
    """A random proper subset of every block's units, one block (chosen by seed) removed."""
    rng = np.random.default_rng(seed)
    keep = {}
    for b in s.blocks:
        n = int(rng.integers(1, b.n_units))
        keep[b.name] = sorted(rng.choice(b.n_units, size=n, replace=False).tolist())
    keep[s.blocks[seed % len(s.blocks)].name] = []
    return keep


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_random_keep_sets_masked_equals_sliced(tiny_exports, form):
    seed = FORMS.index(form)
    m, s = load_analyze(tiny_exports[form])
    assert len(s.blocks) == 4
    keep = random_keep(s, seed)
    removed = s.blocks[seed % len(s.blocks)]
    dense_proto = ir.to_proto(m)
    before = dense_proto.SerializeToString()

    masked = instrument.masked_model(m, s, unit_masks(s, keep))
    sliced = rewrite.rewrite(m, s, keep)
    assert ir.to_proto(m).SerializeToString() == before, "the input model was mutated"

    proto = ir.to_proto(sliced)
    onnx.checker.check_model(proto, full_check=True)
    assert io_dims(proto) == io_dims(dense_proto)
    assert any(isinstance(d, str) for _, _, dims in io_dims(proto) for d in dims)

    # Smaller: fewer weight elements, by at least the removed block's projection weights.
    n_before, size_before = float_params(dense_proto)
    n_after, size_after = float_params(proto)
    assert size_after < size_before
    removed_weights = sum(
        int(np.prod(const_array(graph.nodes_by_name(m.graph)[sl.node].inputs[sl.input_index]).shape))
        for sl in removed.slices)
    assert size_before - size_after >= removed_weights
    assert n_after < n_before  # the removed block's weights are gone, not replaced
    used = {v.name for n in sliced.graph for v in n.inputs if v is not None}
    used |= {v.name for v in sliced.graph.outputs}
    assert set(sliced.graph.initializers) <= used, "unused initializers left behind"
    assert op_count(sliced) < op_count(m)

    for batch, seq in SIZES:
        feeds = tiny_feeds(batch, seq, seed=seed * 10 + batch + seq)
        want, got, dense = run(masked, feeds), run(proto, feeds), run(m, feeds)
        assert len(got) == len(want) == 1
        assert got[0].shape == dense[0].shape
        np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0,
                                   err_msg=f"batch {batch}, seq {seq}, keep {keep}")
        assert np.abs(dense[0] - got[0]).max() > 1e-3, "pruning had no visible effect"


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_removing_an_ffn_keeps_the_residual_and_its_bias(tiny_exports, form):
    m, s = load_analyze(tiny_exports[form])
    block = next(b for b in s.blocks if b.name == "layer0.mlp")
    r = block.removal
    assert r is not None
    dense_nodes = graph.nodes_by_name(m.graph)
    bias = sum(np.asarray(const_array(dense_nodes[n].inputs[i]), np.float64) for n, i in r.bias_uses)
    assert len(r.bias_uses) == 1, "the FFN output bias (an Add, or the Gemm's C)"

    sliced = rewrite.rewrite(m, s, {"layer0.mlp": []})
    onnx.checker.check_model(ir.to_proto(sliced), full_check=True)
    # Both FFN projections are gone, nothing else is.
    assert op_count(sliced) == op_count(m) - 2
    names = {n.name for n in sliced.graph}
    assert not (set(block.sources) | {c.node for c in block.consumers}) & names
    # The residual add survives and adds exactly the bias in place of the FFN output.
    add = graph.nodes_by_name(sliced.graph)[r.node]
    assert add.op_type == "Add"
    got_bias = const_array(add.inputs[r.input_index])
    assert got_bias is not None
    np.testing.assert_allclose(np.asarray(got_bias, np.float64), bias, rtol=0, atol=1e-6)
    assert add.inputs[1 - r.input_index].name == dense_nodes[r.node].inputs[1 - r.input_index].name
    # The layer-0 attention block and everything in layer 1 are intact.
    for b in s.blocks:
        if b is not block:
            assert set(b.sources) | {c.node for c in b.consumers} <= names

    masked = instrument.masked_model(m, s, {"layer0.mlp": np.zeros(block.n_units, np.float32)})
    for batch, seq in ((1, 5), (3, 40)):
        feeds = tiny_feeds(batch, seq, seed=batch + seq)
        got, want, dense = run(sliced, feeds)[0], run(masked, feeds)[0], run(m, feeds)[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(got - dense).max() > 1e-3


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_keeping_every_unit_is_the_dense_graph(tiny_exports, form):
    m, s = load_analyze(tiny_exports[form])
    keep = {b.name: list(range(b.n_units))[::-1] for b in s.blocks}  # order does not matter
    sliced = rewrite.rewrite(m, s, keep)
    dense_proto, proto = ir.to_proto(m), ir.to_proto(sliced)
    # The same nodes and weights (rewrite only forgets recorded intermediate shapes).
    assert [node_key(n) for n in proto.graph.node] == [node_key(n) for n in dense_proto.graph.node]
    assert sorted(t.SerializeToString() for t in proto.graph.initializer) == \
        sorted(t.SerializeToString() for t in dense_proto.graph.initializer)
    assert io_dims(proto) == io_dims(dense_proto)
    for batch, seq in ((1, 5), (3, 40)):
        feeds = tiny_feeds(batch, seq, seed=7)
        for got, want in zip(run(proto, feeds, optimize=False), run(m, feeds, optimize=False)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(run(proto, feeds), run(m, feeds)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # And the all-ones mask is the dense graph too (x * 1 is exact).
    ones = instrument.masked_model(m, s, {b.name: np.ones(b.n_units) for b in s.blocks})
    feeds = tiny_feeds(2, 9, seed=3)
    np.testing.assert_array_equal(run(ones, feeds, optimize=False)[0],
                                  run(m, feeds, optimize=False)[0])


def test_invalid_keep_sets_are_refused(tiny_exports):
    m, s = load_analyze(tiny_exports[("torchscript", "none", False)])
    for bad in ([4], [-1], [0, 0]):
        with pytest.raises(OptinError, match="invalid units"):
            rewrite.rewrite(m, s, {"layer0.attention": bad})
