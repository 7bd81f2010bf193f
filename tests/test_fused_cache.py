"""Fused decoder attention with its KV cache on the interface (issue 9).

onnxruntime's ``GroupQueryAttention`` (what its generation builder writes for Llama-style
decoders) and ``MultiHeadAttention``, and the ONNX ``Attention`` op (opset 23) with grouped
heads, with past/present states: the heads are found (for GQA one unit is a
key/value head with its query heads), pruned, the head-count attributes edited, the cache's head
axis shrunk, and the slim model equals the masked dense model with a non-empty past too. Built
with ``onnx.helper`` at test time: one attention block and one MLP on a residual stream, the
sequence lengths computed from the attention mask inside the graph, as the builder does.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from optin_onnx.analysis import pruned_feeds
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.pipeline import analyze, as_model, prune
from tests.helpers import run

C, D, F = 32, 8, 48


def decoder(op: str, heads: int = 4, kv_heads: int = 2, past: bool = True,
            present_read: bool = False, rotary: bool = False) -> onnx.ModelProto:
    """x [B, S, C] -> Q/K/V projections -> ``op`` (past and present states when ``past``) -> W_o
    -> residual -> MLP -> residual. ``present_read``: the present key also feeds a graph node.
    ``rotary``: Q and K pass through onnxruntime's ``RotaryEmbedding`` (3-D, ``num_heads``) at
    positions counted from the attention mask, as its generation builder writes."""
    rng = np.random.default_rng(0)
    kv = heads if op == "MultiHeadAttention" else kv_heads
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3)
                                             .astype(np.float32), name))
        return name
    nodes = [helper.make_node("MatMul", ["x", w("wq", C, heads * D)], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", w("wk", C, kv * D)], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", w("wv", C, kv * D)], ["v"], name="v_proj")]
    states = ["past_key", "past_value"] if past else ["", ""]
    if rotary:
        angles = np.arange(64)[:, None] / 10000 ** (np.arange(D // 2)[None] / (D // 2))
        inits += [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                  numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        nodes += [helper.make_node("CumSum", ["attention_mask", "one"], ["count"]),
                  helper.make_node("Sub", ["count", "one"], ["positions_all"]),
                  helper.make_node("Shape", ["x"], ["x_shape"]),
                  helper.make_node("Gather", ["x_shape", "one"], ["seq"]),
                  helper.make_node("Unsqueeze", ["seq", "axis0"], ["seq1"]),
                  helper.make_node("Neg", ["seq1"], ["from_end"]),
                  helper.make_node("Slice", ["positions_all", "from_end", "big", "axis1"],
                                   ["positions"])]
        inits += [numpy_helper.from_array(np.array([2**62], np.int64), "big"),
                  numpy_helper.from_array(np.array([0], np.int64), "axis0")]
        for name, n in (("q", heads), ("k", kv)):
            nodes.append(helper.make_node("RotaryEmbedding", [name, "positions", "cos", "sin"],
                                          [f"{name}_rot"], domain="com.microsoft",
                                          num_heads=n))
        qkv_in = ["q_rot", "k_rot", "v"]
    else:
        qkv_in = ["q", "k", "v"]
    if op == "GroupQueryAttention":
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["n"], keepdims=0),
            helper.make_node("Sub", ["n", "one"], ["n1"]),
            helper.make_node("Cast", ["n1"], ["seqlens_k"], to=T.INT32),
            helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
            helper.make_node("Gather", ["mask_shape", "one"], ["total"]),
            helper.make_node("Cast", ["total"], ["total_len"], to=T.INT32),
            helper.make_node(op, [*qkv_in, *states, "seqlens_k", "total_len"],
                             ["attn", "present_key", "present_value"], name="attention",
                             domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)]
    elif op == "Attention4d":  # the ONNX op, 4-D form: heads split and merged outside it
        inits += [numpy_helper.from_array(np.array([0, 0, heads, D], np.int64), "q_heads"),
                  numpy_helper.from_array(np.array([0, 0, kv_heads, D], np.int64), "kv_split"),
                  numpy_helper.from_array(np.array([0, 0, heads * D], np.int64), "merged")]
        for name, target in (("q", "q_heads"), ("k", "kv_split"), ("v", "kv_split")):
            nodes += [helper.make_node("Reshape", [name, target], [f"{name}4"]),
                      helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3])]
        nodes += [helper.make_node("Attention", ["qh", "kh", "vh", "", *states],
                                   ["attn_h", "present_key", "present_value"], name="attention"),
                  helper.make_node("Transpose", ["attn_h"], ["attn_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["attn_t", "merged"], ["attn"])]
    elif op == "Attention":  # the ONNX op (opset 23), 3-D form
        nodes.append(helper.make_node(op, ["q", "k", "v", "", *states],
                                      ["attn", "present_key", "present_value"], name="attention",
                                      q_num_heads=heads, kv_num_heads=kv_heads))
    else:
        nodes.append(helper.make_node(op, ["q", "k", "v", "", "", "", *states],
                                      ["attn", "present_key", "present_value"], name="attention",
                                      domain="com.microsoft", num_heads=heads))
    nodes += [helper.make_node("MatMul", ["attn", w("wo", heads * D, C)], ["o"], name="o_proj"),
              helper.make_node("Add", ["x", "o"], ["h"], name="residual1"),
              helper.make_node("MatMul", ["h", w("w1", C, F)], ["a"], name="fc1"),
              helper.make_node("Relu", ["a"], ["r"], name="act"),
              helper.make_node("MatMul", ["r", w("w2", F, C)], ["m"], name="fc2"),
              helper.make_node("Add", ["h", "m"], ["y"], name="residual2")]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, ["B", "S", C])]
    if present_read:
        nodes.append(helper.make_node("ReduceMean", ["present_key"], ["key_mean"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("key_mean", T.FLOAT, []))
    outputs += [helper.make_tensor_value_info(n, T.FLOAT, ["B", kv, "total", D])
                for n in ("present_key", "present_value")]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, ["B", "S", C])]
    if past:
        inputs += [helper.make_tensor_value_info(n, T.FLOAT, ["B", kv, "past", D])
                   for n in ("past_key", "past_value")]
    if op == "GroupQueryAttention":
        inputs.append(helper.make_tensor_value_info("attention_mask", T.INT64, ["B", "total"]))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                   helper.make_opsetid("com.microsoft", 1)])


def feeds(model: onnx.ModelProto, n: int, seq: int = 6, past: int = 0, seed: int = 0
          ) -> dict[str, np.ndarray]:
    """``n`` samples; the cache holds ``past`` positions (0: a generation's first step)."""
    rng = np.random.default_rng(seed)
    names = {v.name: v for v in model.graph.input}
    out = {"x": rng.standard_normal((n, seq, C)).astype(np.float32)}
    for name in ("past_key", "past_value"):
        if name in names:
            kv = names[name].type.tensor_type.shape.dim[1].dim_value
            out[name] = rng.standard_normal((n, kv, past, D)).astype(np.float32)
    if "attention_mask" in names:
        out["attention_mask"] = np.ones((n, past + seq), np.int64)
    return out


@pytest.mark.parametrize("op,units,group,attribute", [
    ("GroupQueryAttention", 2, 2, "num_heads"), ("MultiHeadAttention", 4, 1, "num_heads"),
    ("Attention", 2, 2, "q_num_heads"), ("Attention4d", 2, 2, None)])
def test_heads_and_cache_ports_found(op, units, group, attribute):
    model = decoder(op)
    _, structure = analyze(model, feeds(model, 4))
    attention = next(b for b in structure.blocks if b.kind == "attention")
    assert attention.n_units == units and attention.unit_size == D
    assert sorted(p.name for p in attention.ports) == ["past_key", "past_value", "present_key",
                                                       "present_value"]
    if attribute is not None:
        assert {e.name: e.group for e in attention.attr_edits}[attribute] == group


@pytest.mark.parametrize("op", ["GroupQueryAttention", "MultiHeadAttention", "Attention",
                                "Attention4d"])
def test_fused_cache_heads_pruned_exactly(op):
    model = decoder(op)
    result = prune(model, feeds(model, 16), flops=0.85, prune="heads", latency_cases=[],
                   samples=8, reconstruct="none")
    assert result.verification.passed
    keep = result.selection.keep
    attention = next(b for b in result.structure.blocks if b.kind == "attention")
    kept = len(keep[attention.name])
    assert 0 < kept < attention.n_units
    node = next(n for n in result.model.graph.node if n.op_type == op.replace("4d", ""))
    counts = {a.name: a.i for a in node.attribute}
    if op == "Attention4d":
        assert not counts  # the head counts are the Reshapes' (edited) and the inputs' shapes
    elif op != "MultiHeadAttention":
        assert (counts.get("num_heads", counts.get("q_num_heads")), counts["kv_num_heads"]) == \
            (2 * kept, kept)
    else:
        assert counts["num_heads"] == kept
    assert {e["name"]: e["after"] for e in result.report.interface} == {
        "past_key": kept, "past_value": kept, "present_key": kept, "present_value": kept}
    assert result.report.objective_outputs == ["y"]
    reference = ir.to_proto(masked_model(as_model(model), result.structure,
                                         unit_masks(result.structure, keep)))
    changes = result.structure.interface(keep)
    # GQA on CPU takes a non-empty past with one new token per row, or one row.
    for n, seq, past in ((2, 1, 3), (1, 5, 4)):
        check = feeds(model, n, seq, past, seed=7)
        want = run(reference, check)
        got = run(result.model, pruned_feeds(check, changes))
        for out, w, g in zip(result.model.graph.output, want, got):
            w = changes[out.name].take(w) if out.name in changes else w
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_present_read_inside_the_graph_is_a_barrier():
    """A present state that the graph itself reads cannot change its heads axis unseen."""
    model = decoder("GroupQueryAttention", present_read=True)
    _, structure = analyze(model, feeds(model, 4))
    assert [b.kind for b in structure.blocks] == ["mlp"]
    assert any("present state output 1 is read inside the graph" in r
               for d in structure.declined for r in d.reasons)


def test_gqa_without_cache():
    """A first-step export (no past inputs) still writes the present state."""
    model = decoder("GroupQueryAttention", past=False)
    result = prune(model, feeds(model, 16), flops=0.85, prune="heads", latency_cases=[],
                   samples=8, reconstruct="none")
    assert result.verification.passed
    # No past to read: only the present outputs (the new keys and values) shrink.
    assert {e["name"] for e in result.report.interface} <= {"present_key", "present_value"}


@pytest.mark.parametrize("op", ["GroupQueryAttention", "MultiHeadAttention", "Attention"])
def test_fused_past_found_and_filled_empty(op):
    """A fused op's past inputs are cache inputs (axis 2, the past length): a calibration
    without them gets an empty past, and the prune runs."""
    from optin_onnx.io import cache_inputs

    model = decoder(op)
    assert cache_inputs(as_model(model)) == {"past_key": 2, "past_value": 2}
    calib = {k: v for k, v in feeds(model, 16).items() if not k.startswith("past")}
    result = prune(model, calib, flops=0.85, prune="heads", latency_cases=[],
                   samples=8, reconstruct="none")
    assert result.verification.passed


def test_rotary_embedding_keeps_the_heads():
    """onnxruntime's RotaryEmbedding on Q and K (3-D, ``num_heads``): its head count shrinks
    with the kept heads, exactly."""
    model = decoder("GroupQueryAttention", rotary=True)
    result = prune(model, feeds(model, 16), flops=0.85, prune="heads", latency_cases=[],
                   samples=8, reconstruct="none")
    assert result.verification.passed
    kept = len(result.selection.keep["layer0.attention"])
    assert kept == 1
    rotary = sorted(a.i for n in result.model.graph.node if n.op_type == "RotaryEmbedding"
                    for a in n.attribute if a.name == "num_heads")
    assert rotary == [kept, 2 * kept]
    reference = ir.to_proto(masked_model(as_model(model), result.structure,
                                         unit_masks(result.structure, result.selection.keep)))
    changes = result.structure.interface(result.selection.keep)
    check = feeds(model, 1, 5, 4, seed=7)
    want = run(reference, check)[0]
    np.testing.assert_allclose(run(result.model, pruned_feeds(check, changes))[0], want,
                               atol=1e-5, rtol=1e-5)
