"""Stage *analyse*: which blocks are found, in real exports and in hand-built attention graphs.

The synthetic encoders cover the three ways a head count reaches a Reshape (a constant target, a
Concat of Shape/Gather pieces and constants, an inferred -1) with every shape constant and bias
shared by both layers, which is what onnxsim and the dynamo exporter produce: pruning one layer must
give that layer private copies and leave the other layer's constants alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import analysis, graph, instrument, probe, rewrite
from optin_onnx.graph import const_array
from tests.helpers import FORMS, form_id, load_analyze, run

H, D, F = 3, 4, 10  # heads, head size, FFN width of the synthetic encoders
C = H * D  # model width
ENCODINGS = ("const", "concat", "concat_init", "infer")
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Identity"}


# -- real exports --------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_every_export_form_has_two_layers_of_heads_and_neurons(tiny_exports, form):
    m, s = load_analyze(tiny_exports[form])
    assert s.declined == []
    got = [(b.name, b.kind, b.layer, b.n_units, b.unit_size) for b in s.blocks]
    assert got == [
        ("layer0.attention", "attention", 0, 4, 8),
        ("layer0.mlp", "mlp", 0, 48, 1),
        ("layer1.attention", "attention", 1, 4, 8),
        ("layer1.mlp", "mlp", 1, 48, 1),
    ]
    assert s.n_layers == 2
    names = {n.name for n in m.graph}
    for b in s.blocks:
        # Q, K and V are one attention group (three sources); an FFN has one. One consumer each.
        assert len(b.sources) == (3 if b.kind == "attention" else 1)
        assert len(b.consumers) == 1
        assert {c.node for c in b.consumers} <= names and set(b.sources) <= names
        assert b.removal is not None, f"{b.name} cannot be removed"
    # The four blocks are disjoint: no weight is claimed by two blocks.
    weights = [(sl.node, sl.input_index) for b in s.blocks for sl in b.slices]
    assert len(weights) == len(set(weights))


# -- synthetic encoders --------------------------------------------------------------------------

def build_encoder(encoding: str = "const", *, layers: int = 2, ffn_op: str | None = None,
                  branch: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A post-LN transformer encoder on x [B, S, C] written with ``onnx.helper``.

    ``encoding`` picks how the head-splitting Reshape gets its target shape:
      const        one shared initializer [0, 0, H, D] (allowzero=0: 0 copies the input dim)
      concat       one Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)),
                   Constant[H], Constant[D]) node shared by every split of every layer
      concat_init  the same Concat per projection, all reading one shared [H] initializer
      infer        one shared initializer [0, 0, -1, D]
    The merging Reshape always reads one shared constant [0, 0, H*D]. Every Q/K/V/O and FFN-output
    bias is the same initializer, every FFN-input bias another, LayerNorm scale/bias shared too.

    ``ffn_op`` puts an op without an analysis handler on layer 0's FFN hidden axis ("Einsum",
    "TopK", "custom" = com.example.Swish, "twin" = an Identity with the custom op's names, to probe
    the custom model): inline (between bias and activation) or, with ``branch``, on a side branch
    to an extra graph output. Node names are ``l<layer>_<role>``.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, name, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=name, **kw))
        return outs[0]

    def w(shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    bias = init("shared_bias", (rng.standard_normal(C) * 0.3).astype(np.float32))
    b1 = init("shared_ffn_bias", (rng.standard_normal(F) * 0.3).astype(np.float32))
    gamma = init("shared_ln_scale", (1 + rng.standard_normal(C) * 0.1).astype(np.float32))
    merge = init("shared_merge_shape", np.array([0, 0, C], np.int64))
    scale = init("shared_scale", np.array(1 / np.sqrt(D), np.float32))
    split = None
    if encoding == "const":
        split = init("shared_split_shape", np.array([0, 0, H, D], np.int64))
    elif encoding == "infer":
        split = init("shared_split_shape", np.array([0, 0, -1, D], np.int64))
    elif encoding in ("concat", "concat_init"):
        init("idx0", np.array(0, np.int64))
        init("idx1", np.array(1, np.int64))
        init("axes0", np.array([0], np.int64))
        node("Shape", ["x"], ["x_shape"], "shape_of_x")
        node("Gather", ["x_shape", "idx0"], ["dim_b"], "gather_b", axis=0)
        node("Gather", ["x_shape", "idx1"], ["dim_s"], "gather_s", axis=0)
        node("Unsqueeze", ["dim_b", "axes0"], ["dim_b1"], "unsq_b")
        node("Unsqueeze", ["dim_s", "axes0"], ["dim_s1"], "unsq_s")
        if encoding == "concat":
            node("Constant", [], ["const_heads"], "const_heads",
                 value=numpy_helper.from_array(np.array([H], np.int64)))
            node("Constant", [], ["const_head_dim"], "const_head_dim", value_ints=[D])
            split = node("Concat", ["dim_b1", "dim_s1", "const_heads", "const_head_dim"],
                         ["split_shape"], "split_concat", axis=0)
        else:
            init("shared_heads", np.array([H], np.int64))
            init("shared_head_dim", np.array([D], np.int64))
    else:
        raise ValueError(encoding)

    def unknown_op(op, h, p):
        out = [p + "ffn_odd"]
        if op == "Einsum":
            return node("Einsum", [h], out, p + "odd", equation="bsf->bsf")
        if op == "TopK":
            k = init(p + "topk_k", np.array([F], np.int64))
            return node("TopK", [h, k], out + [p + "ffn_odd_idx"], p + "odd", axis=-1)
        if op == "custom":
            return node("Swish", [h], out, p + "odd", domain="com.example")
        if op == "twin":
            return node("Identity", [h], out, p + "odd")
        raise ValueError(op)

    side_outputs = []
    x = "x"
    for layer in range(layers):
        p = f"l{layer}_"
        heads = {}
        for t, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            target = split
            if encoding == "concat_init":
                target = node("Concat", ["dim_b1", "dim_s1", "shared_heads", "shared_head_dim"],
                              [p + t + "_shape"], p + t + "_shape_concat", axis=0)
            h = node("MatMul", [x, init(p + f"W{t}", w((C, C)))], [p + t + "_mm"], p + t + "_proj")
            h = node("Add", [h, bias], [p + t], p + t + "_bias")
            h = node("Reshape", [h, target], [p + t + "_4d"], p + t + "_split")
            heads[t] = node("Transpose", [h], [p + t + "_t"], p + t + "_transpose", perm=perm)
        s = node("MatMul", [heads["q"], heads["k"]], [p + "scores"], p + "qk")
        s = node("Mul", [s, scale], [p + "scaled"], p + "scale")
        s = node("Softmax", [s], [p + "probs"], p + "softmax", axis=-1)
        ctx = node("MatMul", [s, heads["v"]], [p + "ctx"], p + "pv")
        ctx = node("Transpose", [ctx], [p + "ctx_t"], p + "ctx_transpose", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge], [p + "ctx_flat"], p + "merge")
        o = node("MatMul", [ctx, init(p + "Wo", w((C, C)))], [p + "o_mm"], p + "o_proj")
        o = node("Add", [o, bias], [p + "o"], p + "o_bias")
        r = node("Add", [x, o], [p + "res1"], p + "residual1")
        x1 = node("LayerNormalization", [r, gamma, bias], [p + "ln1"], p + "ln1", axis=-1)
        h = node("MatMul", [x1, init(p + "W1", w((C, F)))], [p + "ffn_mm"], p + "ffn_in")
        h = node("Add", [h, b1], [p + "ffn_pre"], p + "ffn_bias")
        if ffn_op is not None and layer == 0:
            odd = unknown_op(ffn_op, h, p)
            if branch:
                side_outputs.append(odd)
            else:
                h = odd
        h = node("Relu", [h], [p + "ffn_act"], p + "ffn_act")
        h = node("MatMul", [h, init(p + "W2", w((F, C)))], [p + "ffn_out_mm"], p + "ffn_out")
        h = node("Add", [h, bias], [p + "ffn_out"], p + "ffn_out_bias")
        r = node("Add", [x1, h], [p + "res2"], p + "residual2")
        x = node("LayerNormalization", [r, gamma, bias], [p + "ln2"], p + "ln2", axis=-1)
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "S", C])]
    outputs += [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["B", "S", F])
                for v in side_outputs]
    g = helper.make_graph(nodes, f"synthetic_{encoding}",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", C])],
                          outputs, inits)
    opsets = [helper.make_opsetid("", 17)]
    if ffn_op == "custom":
        opsets.append(helper.make_opsetid("com.example", 1))
    return helper.make_model(g, opset_imports=opsets, producer_name="optin-tests")


def x_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, C)).astype(np.float32)}


def unit_masks(s: analysis.Structure, keep: dict[str, list[int]]) -> dict[str, np.ndarray]:
    return {b: np.isin(np.arange(s_b.n_units), units).astype(np.float32)
            for b, units in keep.items() for s_b in s.blocks if s_b.name == b}


def closure(v: ir.Value | None):
    """What ``v`` is, as far as constants decide it: a constant's dtype/shape/bytes; a shape
    computation spelled out recursively; any other run-time value by its name."""
    if v is None:
        return None
    arr = const_array(v)
    if arr is not None:
        arr = np.asarray(arr)
        return ("const", arr.dtype.str, arr.shape, arr.tobytes())
    p = v.producer()
    if p is None or p.op_type not in SHAPE_OPS:
        return ("value", v.name)
    attrs = tuple(sorted((k, repr(a.value)) for k, a in p.attributes.items()))
    return (p.op_type, attrs, v.index(), tuple(closure(i) for i in p.inputs))


def layer_signature(model: ir.Model, layer: int) -> dict[str, tuple]:
    return {n.name: (n.op_type, tuple(closure(v) for v in n.inputs))
            for n in model.graph if n.name.startswith(f"l{layer}_")}


def test_synthetic_model_is_valid_and_dense_blocks_are_found():
    for enc in ENCODINGS:
        proto = build_encoder(enc)
        onnx.checker.check_model(proto, full_check=True)
        m, s = load_analyze(proto)
        assert s.declined == [], enc
        assert [(b.name, b.n_units, b.unit_size) for b in s.blocks] == [
            ("layer0.attention", H, D), ("layer0.mlp", F, 1),
            ("layer1.attention", H, D), ("layer1.mlp", F, 1)], enc
        att0 = s.blocks[0]
        assert sorted(att0.sources) == ["l0_k_proj", "l0_q_proj", "l0_v_proj"]
        assert [c.node for c in att0.consumers] == ["l0_o_proj"]
        # The merge width is always a constant to rewrite; the head count is, unless inferred.
        edited = {e.node for e in att0.shape_edits}
        assert "l0_merge" in edited
        if enc == "infer":
            assert edited == {"l0_merge"}
        else:
            assert edited == {"l0_merge", "l0_q_split", "l0_k_split", "l0_v_split"}


KEEP_SETS = [
    # Different heads and neurons in each layer.
    {"layer0.attention": [0, 2], "layer1.attention": [1],
     "layer0.mlp": [1, 3, 4, 8], "layer1.mlp": [0, 9]},
    # One attention block removed, the other layer's heads cut to one.
    {"layer0.attention": [2], "layer1.attention": [],
     "layer0.mlp": [5], "layer1.mlp": [2, 3, 4, 5, 6, 7, 8]},
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("k", range(len(KEEP_SETS)))
def test_synthetic_masked_equals_sliced_with_shared_constants(encoding, k):
    keep = KEEP_SETS[k]
    m, s = load_analyze(build_encoder(encoding))
    before = ir.to_proto(m).SerializeToString()
    masked = instrument.masked_model(m, s, unit_masks(s, keep))
    sliced = rewrite.rewrite(m, s, keep)
    assert ir.to_proto(m).SerializeToString() == before, "rewrite mutated its input"
    sliced_proto = ir.to_proto(sliced)
    onnx.checker.check_model(sliced_proto, full_check=True)
    for batch in (1, 5):
        for seq in (2, 13):
            feeds = x_feeds(batch, seq, seed=batch * 100 + seq)
            (want,), (got,), (dense,) = run(masked, feeds), run(sliced_proto, feeds), run(m, feeds)
            assert got.shape == (batch, seq, C)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
            assert np.abs(dense - got).max() > 1e-2, "pruning had no effect"

    # The kept sizes are spelled out in the pruned graph's shape constants, per layer.
    nodes = graph.nodes_by_name(sliced.graph)
    for layer in (0, 1):
        heads = len(keep[f"layer{layer}.attention"])
        if heads == 0:
            assert f"l{layer}_merge" not in nodes and f"l{layer}_q_proj" not in nodes
            continue
        merge = const_array(nodes[f"l{layer}_merge"].inputs[1])
        assert merge.tolist() == [0, 0, heads * D]
        for t in "qkv":
            split = nodes[f"l{layer}_{t}_split"].inputs[1]
            if encoding in ("const", "infer"):
                want = [0, 0, -1 if encoding == "infer" else heads, D]
                assert const_array(split).tolist() == want
            else:
                concat = split.producer()
                assert concat.op_type == "Concat"
                assert const_array(concat.inputs[2]).tolist() == [heads]
                assert const_array(concat.inputs[3]).tolist() == [D]
                assert concat.inputs[0].producer().op_type == "Unsqueeze"
        assert nodes[f"l{layer}_ffn_in"].inputs[1].const_value.shape[1] == \
            len(keep[f"layer{layer}.mlp"])


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("pruned", [0, 1])
def test_pruning_one_layer_leaves_the_other_layers_constants_alone(encoding, pruned):
    """Every constant that both layers share (shape targets, the shared Concat, biases) is given
    a private copy for the pruned layer; the other layer's nodes read exactly what they read."""
    m, s = load_analyze(build_encoder(encoding))
    other = 1 - pruned
    keep = {f"layer{pruned}.attention": [1], f"layer{pruned}.mlp": [0, 2, 7]}
    sliced = rewrite.rewrite(m, s, keep)
    assert layer_signature(sliced, other) == layer_signature(m, other)
    # ... and the pruned layer did change (the test would be vacuous otherwise).
    changed = layer_signature(sliced, pruned)
    original = layer_signature(m, pruned)
    assert {"l%d_merge" % pruned, "l%d_q_bias" % pruned, "l%d_ffn_bias" % pruned} <= \
        {n for n in original if changed.get(n) != original[n]}
    # The shared bias of the output projection and FFN output (the residual width) is not sliced.
    nodes = graph.nodes_by_name(sliced.graph)
    for name in (f"l{pruned}_o_bias", f"l{pruned}_ffn_out_bias", f"l{pruned}_ln1"):
        assert any(np.asarray(const_array(v)).shape == (C,) for v in nodes[name].inputs[1:]), name
    onnx.checker.check_model(ir.to_proto(sliced), full_check=True)
    masked = instrument.masked_model(m, s, unit_masks(s, keep))
    feeds = x_feeds(2, 6, seed=pruned)
    np.testing.assert_allclose(run(sliced, feeds)[0], run(masked, feeds)[0], atol=1e-4, rtol=0)


# -- ops without a handler ------------------------------------------------------------------------

def analyze_with_unknown(op: str, branch: bool) -> tuple[ir.Model, analysis.Structure]:
    m = graph.normalize(ir.from_proto(build_encoder("const", ffn_op=op, branch=branch)))
    if op == "custom":
        # onnxruntime cannot run com.example ops: probe a twin with the same value names.
        twin = graph.normalize(ir.from_proto(build_encoder("const", ffn_op="twin", branch=branch)))
        values = probe.probe(twin)
    else:
        values = probe.probe(m)
    return m, analysis.analyze_graph(m, values)


UNKNOWN = [("Einsum", "Einsum"), ("TopK", "TopK"), ("custom", "Swish")]


@pytest.mark.parametrize("op,op_type", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_op_on_a_side_branch_of_the_ffn_declines_it(op, op_type):
    m, s = analyze_with_unknown(op, branch=True)
    assert len(s.declined) == 1
    d = s.declined[0]
    assert "l0_ffn_in" in d.name
    assert any(op_type in r and "l0_odd" in r for r in d.reasons), d.reasons
    # Everything else is still found, and nothing claims layer 0's FFN weights.
    found = sorted((b.kind, b.n_units, tuple(sorted(b.sources))) for b in s.blocks)
    assert found == [
        ("attention", H, ("l0_k_proj", "l0_q_proj", "l0_v_proj")),
        ("attention", H, ("l1_k_proj", "l1_q_proj", "l1_v_proj")),
        ("mlp", F, ("l1_ffn_in",)),
    ]
    assert not any("l0_ffn" in sl.node for b in s.blocks for sl in b.slices)


@pytest.mark.parametrize("op,op_type", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_op_inline_on_the_ffn_hidden_axis_declines_it(op, op_type):
    m, s = analyze_with_unknown(op, branch=False)
    assert any(b.kind == "attention" for b in s.blocks)
    assert [d.name for d in s.declined] == ["group@l0_ffn_in"]
    assert any(op_type in r for r in s.declined[0].reasons)


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "inline"])
def test_block_names_stay_unique_when_an_ffn_is_not_prunable(branch):
    m, s = analyze_with_unknown("Einsum", branch=branch)
    names = [b.name for b in s.blocks]
    assert len(names) == len(set(names)), names
    for b in s.blocks:
        layer = int(b.sources[0][1])  # sources are named l<layer>_...
        assert b.layer == layer and b.name.startswith(f"layer{layer}."), (b.name, b.sources)


def windowed_token_model() -> onnx.ModelProto:
    """Token ids [B, S] -> embeddings -> a Reshape into windows of 8 tokens and back (valid only
    when S is a multiple of 8) -> an MLP block."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, C)).astype(np.float32), "emb"),
             numpy_helper.from_array(np.array([0, -1, 8, C], np.int64), "windows"),
             numpy_helper.from_array(np.array([0, -1, C], np.int64), "tokens"),
             numpy_helper.from_array(rng.standard_normal((C, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((24, C)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("Reshape", ["h", "windows"], ["hw"], name="to_windows"),
             helper.make_node("Reshape", ["hw", "tokens"], ["h2"], name="from_windows"),
             helper.make_node("MatMul", ["h2", "w1"], ["a"], name="fc1"),
             helper.make_node("Relu", ["a"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "windowed",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", C])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_probe_falls_back_to_the_calibration_length():
    """The probe's own length (11 tokens) is no multiple of the window: the analysis probes at
    the calibration's 16 tokens instead; a calibration length that is no multiple either gets
    onnxruntime's error at the probe length, in one line."""
    from optin_onnx.errors import OptinError
    from optin_onnx.pipeline import analyze

    model = windowed_token_model()
    ids = np.random.default_rng(1).integers(0, 50, (4, 16))
    _, structure = analyze(model, {"input_ids": ids})
    assert [(b.kind, b.n_units) for b in structure.blocks] == [("mlp", 24)]
    with pytest.raises(OptinError, match="could not run the model"):
        analyze(model, {"input_ids": ids[:, :12]})


def test_windowed_model_prunes_at_the_calibration_length():
    """Every stage that runs the model away from the calibration (canonicalize's probes, verify's
    longer case) finds lengths the model takes."""
    from optin_onnx.pipeline import prune

    ids = np.random.default_rng(1).integers(0, 50, (24, 16))
    result = prune(windowed_token_model(), {"input_ids": ids}, flops=0.7, latency_cases=[],
                   samples=8)
    assert result.verification.passed and not result.verification.skipped
    assert len(result.selection.keep["layer0.mlp"]) < 24
