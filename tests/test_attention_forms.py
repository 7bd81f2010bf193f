"""Heads in every form of attention a user's exporter writes (issue: generality).

transformers' default attention is scaled-dot-product attention (SDPA), not the eager form the
other tests export. Its exports differ where head pruning is delicate:

- TorchScript reads head_dim at run time (``Gather(Shape(q), 3)``) to build Reshape targets and
  the softmax scale: a Shape read of an axis that pruning leaves unchanged.
- torchlib (dynamo) builds K^T as ``[B, H, S, D] -> [B*H, S, D] -> Transpose -> [B, H, D, S]``,
  the last target sliced out of ``Shape(k)``: batch and heads folded into one axis and split back.
- A fresh initialisation's zero biases are one de-duplicated tensor, reached through ``Identity``
  nodes in the TorchScript export: a shared constant must not hide a structure.
- At opset 23 the dynamo exporter writes the standard ONNX ``Attention`` op.
- onnxruntime's transformer optimizer fuses the attention into ``com.microsoft`` ``Attention``
  (packed QKV weight) or ``MultiHeadAttention``, with SkipLayerNormalization and BiasGelu around.

Each form must be analysed into heads and neurons, pruned (heads included), verified against the
masked dense graph, and keep its dynamic batch and sequence axes.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx.graph import const_array
from optin_onnx.pipeline import PruneOptions, prune
from tests.helpers import load_analyze, run, tiny_feeds

#: (exporter, attention implementation, random biases, onnxsim'd, opset)
FORMS = [
    ("torchscript", "sdpa", True, False, 17),
    ("dynamo", "sdpa", True, False, 17),
    ("torchscript", "sdpa", True, True, 17),
    ("dynamo", "sdpa", True, True, 17),
    ("torchscript", None, False, False, 17),  # the library default, zero biases via Identity
    ("dynamo", None, False, False, 17),
    ("torchscript", "eager", False, False, 17),
    ("dynamo", "sdpa", True, False, 23),  # the standard ONNX Attention op
]


def form_id(form) -> str:
    exporter, attention, random_biases, sim, opset = form
    return "-".join([exporter, attention or "default", "bias" if random_biases else "zero-bias"]
                    + (["sim"] if sim else []) + ([f"opset{opset}"] if opset != 17 else []))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple, str]:
    from models import text_encoders as te

    root = tmp_path_factory.mktemp("attention_forms")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for form in FORMS:
            exporter, attention, random_biases, sim, opset = form
            bert = te.tiny_bert(seed=0, attention=attention, random_biases=random_biases)
            path = te.export(te.EncoderWrapper(bert, head="pool"), root / f"{form_id(form)}.onnx",
                             exporter=exporter, opset=opset)
            out[form] = te.simplify(path, root / f"{form_id(form)}_s.onnx") if sim else path
    return out


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_heads_and_neurons_are_found_in_every_layer(exports, form):
    _, s = load_analyze(exports[form])
    assert s.declined == []
    got = [(b.name, b.n_units, b.unit_size) for b in s.blocks]
    assert got == [("layer0.attention", 4, 8), ("layer0.mlp", 48, 1),
                   ("layer1.attention", 4, 8), ("layer1.mlp", 48, 1)]
    for b in s.blocks:
        assert len(b.sources) == (3 if b.kind == "attention" else 1)
    # Every other projection is accounted for: W_O and W_2 of each layer end at the model width.
    assert len(s.model_width) == 4


def io_dims(proto: onnx.ModelProto) -> list[tuple]:
    def dims(vi):
        return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
    return [(vi.name, dims(vi)) for vi in (*proto.graph.input, *proto.graph.output)]


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_heads_are_pruned_exactly_and_axes_stay_dynamic(exports, form, tmp_path):
    feeds = tiny_feeds(12, 12, seed=3)
    result = prune(exports[form], feeds, PruneOptions(flops=0.7, prune="heads", samples=8,
                                                      latency_cases=[]), output=tmp_path / "o.onnx")
    kept = {b: len(u) for b, u in result.selection.keep.items()}
    assert sum(kept[b] for b in ("layer0.attention", "layer1.attention")) < 8
    assert result.report.verify["passed"] is True
    out = onnx.load(str(tmp_path / "o.onnx"))
    dense = onnx.load(str(exports[form]))
    n_in = len(dense.graph.input)
    assert io_dims(out)[:n_in] == io_dims(dense)[:n_in]
    # The batch axis of the output stays symbolic (an exporter may leave the width symbolic too;
    # onnxsim's shape inference then writes the width, which pruning does not change).
    assert isinstance(io_dims(out)[n_in][1][0], str)
    # Any batch and length still run, and agree with the model written to disk.
    other = tiny_feeds(5, 21, seed=4)
    (y,) = run(out, other)
    assert y.shape == (5, 32) and np.isfinite(y).all()


# -- synthetic: what the relaxed Shape reads must still refuse ------------------------------------

def _attention_with_head_count_read(use: str) -> onnx.ModelProto:
    """x [B, S, 8] -> q, k, v (4 heads of 2) -> attention -> Wo. ``Shape(q_heads)[1]`` (the head
    count) feeds a Reshape target ("reshape": proved by the Reshape's own handler), a Cast to
    float multiplied into the output ("scale": the value itself changes with pruning), or the
    target of an Expand to [B, heads, S, S] added to the scores: of a [1, 1, 1, 1] mask ("mask":
    a broadcast, the same for every head) or of a [1, 4, 1, 1] per-head bias ("bias": its Expand
    to fewer heads would fail)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.array([0, 0, 4, 2], np.int64), "split"),
              numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge_head")]
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_p"]),
                  helper.make_node("Reshape", [f"{n}_p", "split"], [f"{n}_r"]),
                  helper.make_node("Transpose", [f"{n}_r"], [f"{n}_h"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k_h"], ["k_t"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_h", "k_t"], ["scores"]),
              helper.make_node("Shape", ["q_h"], ["q_shape"]),
              helper.make_node("Gather", ["q_shape", "one"], ["n_heads"], axis=0)]
    if use in ("mask", "bias"):
        per_head = rng.standard_normal((1, 4 if use == "bias" else 1, 1, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(per_head, "added"),
                  numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([2], np.int64), "two")]
        nodes += [helper.make_node("Shape", ["scores"], ["s_shape"]),
                  helper.make_node("Gather", ["s_shape", "zero"], ["b_1"], axis=0),
                  helper.make_node("Gather", ["s_shape", "two"], ["s_1"], axis=0),
                  helper.make_node("Concat", ["b_1", "n_heads", "s_1", "s_1"], ["to"], axis=0),
                  helper.make_node("Expand", ["added", "to"], ["expanded"]),
                  helper.make_node("Add", ["scores", "expanded"], ["masked"])]
    else:
        nodes.append(helper.make_node("Identity", ["scores"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_h"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3])]
    if use == "reshape":
        inits.append(numpy_helper.from_array(np.array([0, 0], np.int64), "lead"))
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "rest"))
        nodes += [helper.make_node("Concat", ["lead", "n_heads", "rest"], ["t4"], axis=0),
                  helper.make_node("Reshape", ["ctx_t", "t4"], ["ctx_4"]),
                  helper.make_node("Reshape", ["ctx_4", "merge_head"], ["ctx_m"]),
                  helper.make_node("MatMul", ["ctx_m", "wo"], ["y"])]
    elif use == "scale":
        nodes += [helper.make_node("Reshape", ["ctx_t", "merge_head"], ["ctx_m"]),
                  helper.make_node("MatMul", ["ctx_m", "wo"], ["y0"]),
                  helper.make_node("Cast", ["n_heads"], ["h_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["y0", "h_f"], ["y"])]
    else:
        nodes += [helper.make_node("Reshape", ["ctx_t", "merge_head"], ["ctx_m"]),
                  helper.make_node("MatMul", ["ctx_m", "wo"], ["y"])]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        ["b", "s", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_head_count_read_into_a_reshape_target_is_proved():
    _, s = load_analyze(_attention_with_head_count_read("reshape"))
    assert [(b.kind, b.n_units) for b in s.blocks] == [("attention", 4)]


def test_a_mask_expanded_to_the_head_count_read_fits_the_kept_heads():
    """A Shape read of the head axis sizes an Expand of a mask without that axis, added to the
    scores: its slices are identical, so the Expand, sized from the kept heads, fits as it is."""
    from optin_onnx import instrument, rewrite

    m, s = load_analyze(_attention_with_head_count_read("mask"))
    assert s.declined == [] and [(b.kind, b.n_units) for b in s.blocks] == [("attention", 4)]
    keep = {s.blocks[0].name: [1, 2]}
    slim = rewrite.rewrite(m, s, keep)
    masked = instrument.masked_model(m, s, instrument.unit_masks(s, keep))
    x = np.random.default_rng(5).standard_normal((3, 7, 8)).astype(np.float32)
    np.testing.assert_allclose(run(slim, {"x": x})[0], run(masked, {"x": x})[0], atol=1e-5)


def test_a_head_count_read_that_no_handler_proves_declines_the_heads():
    """The same read sizing the Expand of a per-head bias: nothing proves that an Expand of 4
    heads to the kept count holds, so the heads are declined with that read as the reason."""
    _, s = load_analyze(_attention_with_head_count_read("bias"))
    assert s.blocks == []
    assert any("sizes 'Expand" in r and "which nothing proves" in r
               for d in s.declined for r in d.reasons)


def test_head_count_read_as_a_value_declines_the_heads():
    _, s = load_analyze(_attention_with_head_count_read("scale"))
    assert s.blocks == []
    assert any("Shape" in r and "used by Gather" in r for d in s.declined for r in d.reasons)


# -- after onnxruntime's transformer fusion -------------------------------------------------------

FUSIONS = ("Attention", "MultiHeadAttention")


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[str, str]:
    """The eager TorchScript BERT after ``optimize_model(model_type="bert")``: projections and
    attention fused into ``Attention`` (packed QKV weight), or only the attention into
    ``MultiHeadAttention``; SkipLayerNormalization, BiasGelu and EmbedLayerNormalization around
    them. Saved as ``onnx.save(opt.model)`` writes it: without the com.microsoft opset import."""
    import logging

    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from models import text_encoders as te

    root = tmp_path_factory.mktemp("fused")
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = te.export(te.EncoderWrapper(te.tiny_bert(seed=0, attention="eager"), head="pool"),
                       root / "bert.onnx")
        for op in FUSIONS:
            opts = FusionOptions("bert")
            opts.use_multi_head_attention = op == "MultiHeadAttention"
            opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=4, hidden_size=32,
                                           opt_level=0, use_gpu=False, optimization_options=opts)
            assert sum(n.op_type == op for n in opt.model.graph.node) == 2
            out[op] = root / f"{op}.onnx"
            onnx.save(opt.model, out[op])
    return out


@pytest.mark.parametrize("op", FUSIONS)
def test_fused_attention_heads_are_found_with_the_unfused_macs(fused, exports, op):
    from optin_onnx import flops

    m, s = load_analyze(fused[op])
    assert s.declined == []
    assert [(b.name, b.n_units, b.unit_size) for b in s.blocks] == [
        ("layer0.attention", 4, 8), ("layer0.mlp", 48, 1),
        ("layer1.attention", 4, 8), ("layer1.mlp", 48, 1)]
    # The fused node's products are counted: a head costs what it costs unfused.
    ref_m, ref_s = load_analyze(exports[FORMS[0]])
    unit = flops.mac_model(m, s, 16).unit
    ref = flops.mac_model(ref_m, ref_s, 16).unit
    assert unit["layer0.attention"] == pytest.approx(ref["layer0.attention"])


@pytest.mark.parametrize("op", FUSIONS)
def test_fused_attention_is_pruned_with_its_num_heads(fused, op, tmp_path):
    feeds = tiny_feeds(12, 12, seed=3)
    result = prune(fused[op], feeds, PruneOptions(flops=0.7, prune="heads", samples=8,
                                                  latency_cases=[]), output=tmp_path / "o.onnx")
    assert result.report.verify["passed"] is True
    out = onnx.load(str(tmp_path / "o.onnx"))
    heads = [next(a.i for a in n.attribute if a.name == "num_heads")
             for n in out.graph.node if n.op_type == op]
    kept = [len(result.selection.keep[f"layer{i}.attention"]) for i in range(2)]
    assert heads == kept and sum(kept) < 8
    assert "com.microsoft" in {o.domain for o in out.opset_import}


def _two_layers_sharing_a_runtime_head_bias() -> onnx.ModelProto:
    """Two attention layers over x [B, S, 8] (4 heads of 2) whose scores both add one per-head
    bias computed at run time (as T5 and MPNet compute their relative position bias once):
    ``bias [1, 4, 1, 1] = ReduceMean(x) * table``."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.array([0, 0, 4, 2], np.int64), "split"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "table")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "table"], ["bias"])]
    h = "x"
    for layer in range(2):
        def name(n):
            return f"l{layer}_{n}"
        for n in ("q", "k", "v", "o"):
            inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32),
                                                 name(f"w{n}")))
        for n in ("q", "k", "v"):
            nodes += [helper.make_node("MatMul", [h, name(f"w{n}")], [name(f"{n}_p")]),
                      helper.make_node("Reshape", [name(f"{n}_p"), "split"], [name(f"{n}_r")]),
                      helper.make_node("Transpose", [name(f"{n}_r")], [name(f"{n}_h")],
                                       perm=[0, 2, 1, 3])]
        nodes += [helper.make_node("Transpose", [name("k_h")], [name("k_t")], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [name("q_h"), name("k_t")], [name("s")]),
                  helper.make_node("Add", [name("s"), "bias"], [name("sb")]),
                  helper.make_node("Softmax", [name("sb")], [name("p")], axis=-1),
                  helper.make_node("MatMul", [name("p"), name("v_h")], [name("c")]),
                  helper.make_node("Transpose", [name("c")], [name("c_t")], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [name("c_t"), "merge"], [name("c_m")]),
                  helper.make_node("MatMul", [name("c_m"), name("wo")], [name("o")]),
                  helper.make_node("Add", [h, name("o")], [name("y")])]
        h = name("y")
    g = helper.make_graph(nodes, "shared_bias",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_runtime_head_bias_shared_by_layers_is_gathered_per_use(tmp_path):
    from optin_onnx import instrument, rewrite

    model = _two_layers_sharing_a_runtime_head_bias()
    m, s = load_analyze(model)
    assert [(b.kind, b.n_units) for b in s.blocks] == [("attention", 4), ("attention", 4)]
    assert all(any(sl.runtime for sl in b.slices) for b in s.blocks)
    keep = {"layer0.attention": [0, 2, 3], "layer1.attention": [1]}
    slim = rewrite.rewrite(m, s, keep)
    masked = instrument.masked_model(m, s, instrument.unit_masks(s, keep))
    x = np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32)
    (want,) = run(masked, {"x": x})
    (got,) = run(slim, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(n.op_type == "Gather" for n in slim.graph) == 2


# -- DeBERTa's disentangled attention (issue 9) ---------------------------------------------------

def _disentangled(table: str = "projected", index: str = "read") -> onnx.ModelProto:
    """One DeBERTa-v2 attention layer over x [B, 5, 8] (4 heads of 2; 6 relative positions), in
    the forms its exports write. Q, K, V are folded to [B*4, 5, 2] (``view(-1, S, D)``). The
    position keys are the key weight applied to a constant table [1, 6, 8] (``share_att_key``),
    split into [4, 6, 2] and tiled to the batch with the batch read as TorchScript does,
    ``Div(Shape(q)[0], 4)`` (``table="projected"``); or (``"constant"``) that [4, 6, 2] table a
    constant tiled by ``Shape(x)[0]``, as dynamo folds it; or (``"two-heads"``) another
    projection of the table split into 2 heads of 2 and tiled ``2 * Shape(x)[0]`` times: rows
    of the same size as the queries' that hold other heads. c2p = q @ pos_k^T [B*4, 5, 6] is
    gathered along its last axis by a relative-position index: ``index`` "read", [1, 5, 5]
    expanded to ``[Shape(q)[0], 5, 5]``; "counted", expanded to ``[4 * Shape(x)[0], 5, 5]``; or
    "varies", a [4, 5, 5] table with a different index per head, tiled to the batch. The scores
    q @ k^T + c2p go through softmax, @ v, the head merge and Wo to a residual add."""
    rng = np.random.default_rng(3)
    w = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in ("q", "k", "v", "o")}
    rel = rng.standard_normal((1, 6, 8)).astype(np.float32)
    pos_k = (rel @ w["k"]).reshape(1, 6, 4, 2).transpose(0, 2, 1, 3).reshape(4, 6, 2)

    def const(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [const(f"w{n}", a) for n, a in w.items()] + [
        const("rel", rel), const("pos_k_table", pos_k), const("split", np.array([0, 0, 4, 2])),
        const("pos_split", np.array([1, 6, 4, 2])), const("pos_fold", np.array([-1, 6, 2])),
        const("w_pos2", rng.standard_normal((8, 4)).astype(np.float32)),
        const("pos_split2", np.array([1, 6, 2, 2])), const("two", np.array(2)),
        const("fold", np.array([-1, 5, 2])), const("unfold", np.array([-1, 4, 5, 2])),
        const("zero", np.array(0)), const("four", np.array(4)), const("axes0", np.array([0])),
        const("one", np.array([1])), const("five", np.array([5])),
        const("merge", np.array([0, 0, -1])), const("idx_1", rng.integers(0, 6, (1, 5, 5))),
        const("idx_h", rng.integers(0, 6, (4, 5, 5)))]
    node = helper.make_node
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [node("MatMul", ["x", f"w{n}"], [f"{n}_p"]),
                  node("Reshape", [f"{n}_p", "split"], [f"{n}_r"]),
                  node("Transpose", [f"{n}_r"], [f"{n}_h"], perm=[0, 2, 1, 3]),
                  node("Reshape", [f"{n}_h", "fold"], [f"{n}_f"])]
    nodes += [node("Transpose", ["k_f"], ["k_t"], perm=[0, 2, 1]),
              node("MatMul", ["q_f", "k_t"], ["qk"]),
              node("Shape", ["q_f"], ["q_shape"]),
              node("Gather", ["q_shape", "zero"], ["q_rows"], axis=0),
              node("Shape", ["x"], ["x_shape"]),
              node("Gather", ["x_shape", "zero"], ["batch"], axis=0)]
    if table == "constant":
        nodes += [node("Identity", ["pos_k_table"], ["pos_k"]),
                  node("Identity", ["batch"], ["times"])]
    else:
        weight, split = ("wk", "pos_split") if table == "projected" else ("w_pos2", "pos_split2")
        nodes += [node("MatMul", ["rel", weight], ["pos_p"]),
                  node("Reshape", ["pos_p", split], ["pos_r"]),
                  node("Transpose", ["pos_r"], ["pos_h"], perm=[0, 2, 1, 3]),
                  node("Reshape", ["pos_h", "pos_fold"], ["pos_k"])]
        nodes += [node("Div", ["q_rows", "four"], ["times"]) if table == "projected" else
                  node("Mul", ["batch", "two"], ["times"])]
    nodes += [node("Unsqueeze", ["times", "axes0"], ["times_1"]),
              node("Concat", ["times_1", "one", "one"], ["repeats"], axis=0),
              node("Tile", ["pos_k", "repeats"], ["pos_tiled"]),
              node("Transpose", ["pos_tiled"], ["pos_t"], perm=[0, 2, 1]),
              node("MatMul", ["q_f", "pos_t"], ["c2p"])]
    if index == "varies":
        nodes += [node("Unsqueeze", ["batch", "axes0"], ["batch_1"]),
                  node("Concat", ["batch_1", "one", "one"], ["idx_repeats"], axis=0),
                  node("Tile", ["idx_h", "idx_repeats"], ["idx"])]
    else:
        rows = "q_rows" if index == "read" else "heads_x_batch"
        nodes += [node("Mul", ["four", "batch"], ["heads_x_batch"]),
                  node("Unsqueeze", [rows, "axes0"], ["rows_1"]),
                  node("Concat", ["rows_1", "five", "five"], ["idx_shape"], axis=0),
                  node("Expand", ["idx_1", "idx_shape"], ["idx"])]
    nodes += [node("GatherElements", ["c2p", "idx"], ["c2p_g"], axis=2),
              node("Add", ["qk", "c2p_g"], ["scores"]),
              node("Softmax", ["scores"], ["probs"], axis=-1),
              node("MatMul", ["probs", "v_f"], ["ctx"]),
              node("Reshape", ["ctx", "unfold"], ["ctx_u"]),
              node("Transpose", ["ctx_u"], ["ctx_t"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctx_t", "merge"], ["ctx_m"]),
              node("MatMul", ["ctx_m", "wo"], ["o"]),
              node("Add", ["x", "o"], ["y"])]
    g = helper.make_graph(nodes, "disentangled",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("table, index", [("projected", "read"), ("constant", "counted")])
def test_disentangled_attention_heads_are_pruned_exactly(table, index):
    """TorchScript's form (the position keys projected in the graph and tiled by a batch read
    from the folded queries, the index sized from them) and dynamo's (the table a constant, the
    index sized as 4 x batch): one unit per head, and the slim graph equals the masked one at
    other batch sizes."""
    from optin_onnx import instrument, rewrite

    m, s = load_analyze(_disentangled(table, index))
    assert s.declined == []
    (block,) = [b for b in s.blocks if b.kind == "attention"]
    assert block.n_units == 4
    keep = {block.name: [0, 3]}
    slim = rewrite.rewrite(m, s, keep)
    masked = instrument.masked_model(m, s, instrument.unit_masks(s, keep))
    for batch in (1, 3, 6):
        x = np.random.default_rng(batch).standard_normal((batch, 5, 8)).astype(np.float32)
        (want,) = run(masked, {"x": x})
        (got,) = run(slim, {"x": x})
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The unit count is edited where the batch is recovered from, or multiplied into, a folded
    # axis' size: TorchScript's Div and dynamo's Mul by 4 now hold the 2 heads kept.
    counts = [int(c) for n in slim.graph if n.op_type in ("Div", "Mul") for v in n.inputs
              if (c := const_array(v)) is not None and np.size(c) == 1]
    assert 2 in counts


def test_an_index_that_varies_per_head_declines_the_heads():
    """A relative-position index tiled from a per-head table: its slices differ per head, so
    GatherElements is not element-wise on the head axis for it."""
    _, s = load_analyze(_disentangled(index="varies"))
    assert not [b for b in s.blocks if b.kind == "attention"]
    assert any("GatherElements" in r and "not a broadcast along it" in r
               for d in s.declined for r in d.reasons)


def test_a_table_of_other_heads_tiled_to_the_same_rows_is_declined():
    """Position keys with 2 heads, tiled 2B times, have as many rows as the 4B folded queries,
    but row b*4 + h holds key head h % 2: the two folds differ, so the groups must not become one
    unit."""
    _, s = load_analyze(_disentangled(table="two-heads"))
    assert not [b for b in s.blocks if b.kind == "attention"]
    reasons = [r for d in s.declined for r in d.reasons]
    assert "groups of widths 8 and 4 are coupled" in reasons
    assert any("combines folded and unfolded (batch x units) axes" in r for r in reasons)


# -- grouped-query attention (decoders) ------------------------------------------------------------

class _Decoder:
    """A tiny Llama (4 query heads sharing 2 key/value heads, rotary embeddings, SwiGLU MLP,
    RMSNorm), called with keyword arguments and returning the last hidden state."""

    @staticmethod
    def build():
        import torch
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, use_cache=False)
        model = LlamaModel(cfg).eval()

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state

        return Wrapper().eval()


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def llama(request, tmp_path_factory):
    """The tiny Llama from each exporter: torchlib writes repeat_kv's shapes as constants, the
    TorchScript exporter reads them at run time (``Where(Equal(t, -1), ones, t)`` for the Expand,
    ``kv_heads * n_rep`` for the Reshape)."""
    import torch

    path = tmp_path_factory.mktemp("gqa") / f"llama_{request.param}.onnx"
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if request.param == "torchscript":
            torch.onnx.export(_Decoder.build(), (ids, mask), str(path), input_names=names,
                              output_names=["output"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
        else:
            b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
            prog = torch.onnx.export(_Decoder.build(), (ids, mask), input_names=names,
                                     output_names=["output"], dynamo=True, opset_version=18,
                                     dynamic_shapes={n: {0: b, 1: s} for n in names})
            prog.save(str(path))
    return path


def test_grouped_query_heads_are_one_unit_per_key_value_head(llama, tmp_path):
    _, s = load_analyze(llama)
    assert s.declined == []
    attention = [b for b in s.blocks if b.kind == "attention"]
    # 2 units per layer: one key/value head with the 2 query heads that read it.
    assert [(b.n_units, b.unit_size) for b in attention] == [(2, 8), (2, 8)]
    assert all(c.group == 2 for b in attention for c in b.consumers)
    feeds = {k: v for k, v in tiny_feeds(12, 12, seed=3).items() if k != "token_type_ids"}
    result = prune(llama, feeds, PruneOptions(flops=0.85, prune="heads", samples=8,
                                                     latency_cases=[]), output=tmp_path / "o.onnx")
    assert result.report.verify["passed"] is True
    kept = [len(result.selection.keep[b.name]) for b in attention]
    assert sum(kept) < 4
    out = onnx.load(str(tmp_path / "o.onnx"))
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    o_rows = sorted(d[0] for n, d in shapes.items() if len(d) == 2 and d[1] == 32 and d[0] < 32)
    # o_proj keeps 2 query heads of 8 per kept key/value head.
    assert o_rows == sorted(16 * k for k in kept if k < 2)


# -- outputs that pass their inputs through -----------------------------------------------------

def test_pass_through_outputs_first_are_not_the_objective(exports, tmp_path):
    """Third-party sentence-embedding exports return their inputs too, often first."""
    model = onnx.load(str(exports[FORMS[1]]))
    model.graph.node.append(helper.make_node("Identity", ["input_ids"], ["ids_out"]))
    model.graph.node.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    kept = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["b", "s"]),
                               helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["b", "s"]),
                               *kept])
    src = tmp_path / "passthrough.onnx"
    onnx.save(model, src)
    result = prune(src, tiny_feeds(12, 12, seed=3),
                   PruneOptions(flops=0.7, samples=8, latency_cases=[]), output=tmp_path / "o.onnx")
    assert result.report.verify["passed"] is True
    assert result.report.objective_outputs == ["output"]
    assert result.report.outputs_left_out == {"ids_out": "no prunable block reaches it",
                                              "mask_out": "no prunable block reaches it"}
    assert "cosine_to_dense" in result.report.fidelity
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert [o.name for o in out.graph.output] == ["ids_out", "mask_out", "output"]


# -- control flow ----------------------------------------------------------------------------------

def _mlp_read_inside_an_if() -> onnx.ModelProto:
    """x [B, 4] -> MatMul(W1 [4, 8]) -> Relu -> h; an If chooses between MatMul(h, W2) and
    MatMul(h, W3) (its branches read h from the outer graph by name), then MatMul(W4)."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(name, weight):
        return helper.make_graph([helper.make_node("MatMul", ["h", weight.name], [f"{name}_y"])],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y",
                                                                          TensorProto.FLOAT, None)],
                                 [weight])

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("If", ["cond"], ["b"], then_branch=branch("then", w("w2", (8, 8))),
                              else_branch=branch("else", w("w3", (8, 8)))),
             helper.make_node("MatMul", ["b", "w4"], ["y"])]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      ["b", 4]),
                                        helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                          [w("w1", (4, 8)), w("w4", (8, 8))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_value_read_inside_control_flow_is_never_pruned_and_the_branches_are_declined():
    _, s = load_analyze(_mlp_read_inside_an_if())
    assert s.blocks == []
    reasons = [r for d in s.declined for r in d.reasons]
    assert any("no handler for op If" in r for r in reasons)  # h is read inside the branches
    assert any("holds 2 matrix product(s) in its branches" in r for r in reasons)
