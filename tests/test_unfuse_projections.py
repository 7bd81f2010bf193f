"""Fused projections split back before the analysis (issue 9, "Fused projections").

Two kinds of fixture: small ``onnx.helper`` graphs, one per fused form and one per case the
passes must leave alone, and tiny random-config transformers (2 layers, hidden 64, 4 heads)
exported by both exporters with transformers' default attention: GPT-2 (Conv1D ``c_attn``),
Phi-3 (``qkv_proj`` cut by Slices, ``gate_up_proj`` cut by ``torch.chunk``) and ModernBERT
(``Wqkv`` reshaped into [.., 3, H, D], GeGLU ``Wi`` chunked). Every rewrite is checked against the
original graph in onnxruntime at two batch sizes and sequence lengths.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from optin_onnx import analysis, graph, probe
from optin_onnx.passes.fold_slice_bounds import fold_slice_bounds
from optin_onnx.passes.unfuse_projections import split_fused_projections
from tests.helpers import run

IN, OUT = 8, 12  # the synthetic projections: x [batch, seq, 8] @ W [8, 12]
SIZES = ((2, 5), (3, 9))  # (batch, sequence) pairs every rewrite is checked at
INT64_MAX = np.iinfo(np.int64).max


def _c(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values, dtype), name)


def _model(nodes: list, outputs: list[str], inits: list, opset: int = 18,
           x_shape=("batch", "seq", IN), ranked_outputs: int = 3) -> ir.Model:
    """A graph of ``nodes`` from input ``x`` (dynamic batch and sequence) to ``outputs``, with a
    random [8, 12] weight ``W`` and bias ``b`` available to it."""
    rng = np.random.default_rng(0)
    inits = [_c("W", rng.standard_normal((IN, OUT)), np.float32),
             _c("b", rng.standard_normal(OUT), np.float32), *inits]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return graph.normalize(ir.from_proto(proto))


def _slices(src: str, bounds: list[tuple[int, int]], axis: int = 2) -> tuple[list, list, list]:
    """Slices of ``src`` on ``axis``, each followed by a Relu (graph outputs ``o0``, ``o1``..)."""
    nodes, inits, outs = [], [_c("axis", [axis])], []
    for i, (lo, hi) in enumerate(bounds):
        inits += [_c(f"lo{i}", [lo]), _c(f"hi{i}", [hi])]
        nodes += [helper.make_node("Slice", [src, f"lo{i}", f"hi{i}", "axis"], [f"s{i}"]),
                  helper.make_node("Relu", [f"s{i}"], [f"o{i}"])]
        outs.append(f"o{i}")
    return nodes, inits, outs


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch * seq).standard_normal((batch, seq, IN))
            .astype(np.float32)}


def _unfused(m: ir.Model, feeds=_feeds) -> int:
    """Run the pass on ``m`` and check it computes what it computed before, at every size."""
    before = [run(m, feeds(b, s), optimize=False) for b, s in SIZES]
    n = split_fused_projections(m)
    for ref, (b, s) in zip(before, SIZES):
        for want, got in zip(ref, run(m, feeds(b, s), optimize=False)):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return n


def _ops(m: ir.Model) -> list[str]:
    return [n.op_type for n in m.graph]


def _widths(m: ir.Model) -> list[int]:
    """The output widths of the products with a constant 2-D weight, in graph order."""
    out = []
    for n in m.graph:
        w = graph.const_array(n.inputs[1]) if n.op_type in ("MatMul", "Gemm") else None
        if w is not None and w.ndim == 2:
            out.append(w.shape[0] if n.op_type == "Gemm" and graph.attr(n, "transB", 0)
                       else w.shape[1])
    return out


# -- the fused forms -------------------------------------------------------------------------

def test_constant_slices_of_the_last_axis_become_one_matmul_each():
    """Phi-3's qkv_proj: windows [0:4], [4:6], [6:MAX] on axes=[2] (the rank comes from shape
    inference: the graph declares no intermediate shapes)."""
    nodes, inits, outs = _slices("y", [(0, 4), (4, 6), (6, INT64_MAX)])
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes], outs, inits)
    assert _unfused(m) == 1
    assert "Slice" not in _ops(m) and _widths(m) == [4, 2, 6]


def test_an_unused_window_gets_no_matmul():
    nodes, inits, outs = _slices("y", [(-4, INT64_MAX), (0, 3)], axis=-1)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes], outs, inits)
    assert _unfused(m) == 1
    assert sorted(_widths(m)) == [3, 4]


def test_unit_windows_squeezed_without_a_reshape_keep_their_squeeze():
    """Columns cut one by one and squeezed: each part is one column, still squeezed."""
    nodes, inits, outs = _slices("y", [(i, i + 1) for i in range(3)], axis=-1)
    for i in range(3):
        nodes[2 * i + 1] = helper.make_node("Squeeze", [f"s{i}", "m1"], [f"o{i}"])
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes], outs,
               inits + [_c("m1", [-1])])
    assert _unfused(m) == 1
    assert _widths(m) == [1, 1, 1] and _ops(m).count("Squeeze") == 3


@pytest.mark.parametrize("sizes", [None, [4, 8]], ids=["num_outputs", "sizes"])
def test_a_bias_between_the_matmul_and_the_split_is_split_too(sizes):
    """``MatMul -> Add(b) -> Split``: opset 18's ``num_outputs`` (no sizes input), or sizes."""
    split = helper.make_node("Split", ["z", "sizes"] if sizes else ["z"], ["p", "q"], axis=-1,
                             **({} if sizes else {"num_outputs": 2}))
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]),
                helper.make_node("Add", ["b", "y"], ["z"]), split,
                helper.make_node("Relu", ["p"], ["o0"]), helper.make_node("Relu", ["q"], ["o1"])],
               ["o0", "o1"], [_c("sizes", sizes)] if sizes else [])
    assert _unfused(m) == 1
    assert _ops(m).count("Add") == 2 and "Split" not in _ops(m)
    assert _widths(m) == ([6, 6] if sizes is None else sizes)


def _target(dims: str, last: list[int]) -> tuple[list, list]:
    """Nodes computing ``target`` = Concat of x's run-time dims (``dims``: "b" batch, "s"
    sequence, in that order) and the constant ``last``, as exporters build Reshape targets."""
    nodes = [helper.make_node("Shape", ["x"], ["shp"])]
    for d, i in (("b", "zero"), ("s", "one")):
        nodes += [helper.make_node("Gather", ["shp", i], [f"{d}dim"], axis=0),
                  helper.make_node("Unsqueeze", [f"{d}dim", "ax0"], [f"{d}dim1"])]
    nodes.append(helper.make_node("Concat", [f"{d}dim1" for d in dims] + ["last"], ["target"],
                                  axis=0))
    return nodes, [_c("zero", 0), _c("one", 1), _c("ax0", [0]), _c("last", last)]


def _relus(names: str) -> list:
    return [helper.make_node("Relu", [t], [f"o{i}"]) for i, t in enumerate(names)]


@pytest.mark.parametrize("gemm", [{}, {"transB": 1, "alpha": 0.5, "beta": 2.0}],
                         ids=["plain", "transB-alpha-beta"])
def test_gpt2_conv1d_gemm_reshape_split_becomes_three_gemms_with_their_own_targets(gemm):
    """GPT-2's Conv1D: x [B, S, 8] -> [B*S, 8] -> Gemm(W, b) -> [B, S, 12] (the target a Concat
    of run-time B, S and [12]) -> Split(axis=2, [4, 4, 4]); also a Gemm with W stored
    transposed and scaled."""
    shape_nodes, inits = _target("bs", [OUT])
    weight = "Wt" if gemm.get("transB") else "W"
    m = _model([helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                helper.make_node("Gemm", ["x2", weight, "b"], ["y"], **gemm), *shape_nodes,
                helper.make_node("Reshape", ["y", "target"], ["z"]),
                helper.make_node("Split", ["z", "sizes"], ["q", "k", "v"], axis=2),
                *_relus("qkv")], ["o0", "o1", "o2"],
               inits + [_c("flat", [-1, IN]), _c("sizes", [4, 4, 4]),
                        _c("Wt", np.random.default_rng(1).standard_normal((OUT, IN)),
                           np.float32)])
    assert _unfused(m) == 1
    assert _ops(m).count("Gemm") == 3 and _ops(m).count("Concat") == 3
    assert "Split" not in _ops(m) and _widths(m) == [4, 4, 4]
    # Each part's target: run-time B, S and a constant [4] in place of [12].
    lasts = [graph.const_array(n.inputs[-1]).tolist() for n in m.graph if n.op_type == "Concat"]
    assert lasts == [[4]] * 3


def _stacked(dims: str, last: list[int]) -> ir.Model:
    """``MatMul -> Reshape [B, S, 12] -> Concat(dims, last) -> Split(axis=-3, [1, 1, 1]) ->
    Squeeze(-3)``, as ModernBERT's Wqkv in TorchScript."""
    shape_nodes, inits = _target(dims, last)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), *shape_nodes,
             helper.make_node("Reshape", ["y", "target"], ["z"]),
             helper.make_node("Split", ["z", "ones"], ["q3", "k3", "v3"], axis=-3)]
    nodes += [helper.make_node("Squeeze", [f"{t}3", "m3"], [t]) for t in "qkv"]
    return _model(nodes + _relus("qkv"), ["o0", "o1", "o2"],
                  inits + [_c("ones", [1, 1, 1]), _c("m3", [-3])])


def test_modernbert_reshape_into_three_factors_is_split_per_factor():
    """[B, S, 12] -> [B, S, 3, -1, 2]: each part is reshaped to [B, S, -1, 2], the 3 dropped
    from the target (the -1 proved to be 2 by the leading dims being the product's own)."""
    m = _stacked("bs", [3, -1, 2])
    assert _unfused(m) == 1
    assert "Split" not in _ops(m) and "Squeeze" not in _ops(m) and _widths(m) == [4, 4, 4]
    lasts = [graph.const_array(n.inputs[-1]).tolist() for n in m.graph if n.op_type == "Concat"]
    assert lasts == [[-1, 2]] * 3


def test_modernbert_slices_of_the_factor_axis_with_squeeze_are_split_too():
    """The dynamo form of the same: ``Slice(axes=[-3], [i:i+1])`` + ``Squeeze(-3)``, a constant
    target [0, 0, 3, 2, 2]."""
    nodes, inits, _ = _slices("z", [(0, 1), (1, 2), (2, 3)], axis=-3)
    nodes = [n for n in nodes if n.op_type == "Slice"]
    for i in range(3):
        nodes += [helper.make_node("Squeeze", [f"s{i}", "m3"], [f"t{i}"]),
                  helper.make_node("Relu", [f"t{i}"], [f"o{i}"])]
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]),
                helper.make_node("Reshape", ["y", "target"], ["z"]), *nodes],
               ["o0", "o1", "o2"], inits + [_c("target", [0, 0, 3, 2, 2]), _c("m3", [-3])])
    assert _unfused(m) == 1
    assert _widths(m) == [4, 4, 4]
    targets = [graph.const_array(n.inputs[1]).tolist() for n in m.graph if n.op_type == "Reshape"]
    assert targets == [[0, 0, 2, 2]] * 3


def _chunk(read: int = -1) -> ir.Model:
    """TorchScript's ``torch.chunk(y, 2, -1)``: bounds h = (dim + 1) / 2 * 1 and 2h computed at
    run time from ``Shape(y)[read]``."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("Shape", ["y"], ["shp"]),
             helper.make_node("Gather", ["shp", "read"], ["d"], axis=0),
             helper.make_node("Add", ["d", "one"], ["d1"]),
             helper.make_node("Div", ["d1", "two"], ["d2"]),
             helper.make_node("Mul", ["d2", "one"], ["h"]),
             helper.make_node("Mul", ["d2", "two"], ["h2"]),
             helper.make_node("Slice", ["y", "zero", "h", "dim"], ["gate"]),
             helper.make_node("Slice", ["y", "h", "h2", "dim"], ["up"]),
             helper.make_node("Sigmoid", ["gate"], ["sg"]),
             helper.make_node("Mul", ["sg", "up"], ["o0"])]
    return _model(nodes, ["o0"], [_c("read", [read]), _c("dim", [-1]), _c("zero", [0]),
                                  _c("one", [1]), _c("two", [2])])


def test_chunk_bounds_computed_from_the_width_are_folded_and_split():
    m = _chunk()
    assert _unfused(m) == 1
    assert _widths(m) == [6, 6] and "Shape" not in _ops(m) and "Slice" not in _ops(m)


# -- left alone ------------------------------------------------------------------------------

def _untouched(m: ir.Model) -> None:
    ops = _ops(m)
    assert _unfused(m) == 0
    assert _ops(m) == ops


def test_overlapping_windows_are_left_alone():
    nodes, inits, outs = _slices("y", [(0, 8), (4, 12)])
    _untouched(_model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes], outs, inits))


def test_a_slice_of_another_axis_is_left_alone():
    nodes, inits, outs = _slices("y", [(0, 2), (2, 4)], axis=1)
    _untouched(_model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes], outs, inits))


def test_bounds_read_from_the_sequence_length_are_not_folded():
    """The same arithmetic on ``Shape(y)[1]`` (the sequence): the bounds change per run."""
    m = _chunk(read=1)
    assert fold_slice_bounds(m) == 0
    _untouched(m)


def test_a_fused_output_used_elsewhere_is_left_alone():
    nodes, inits, outs = _slices("y", [(0, 6), (6, 12)])
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"]), *nodes,
                helper.make_node("Relu", ["y"], ["all"])], [*outs, "all"], inits)
    _untouched(m)


def test_a_reshape_that_mixes_the_fused_axis_is_left_alone():
    """[B, S, 12] -> [B, 4*S, 3]: the windows of the last axis are not column windows of W."""
    nodes, inits, outs = _slices("z", [(0, 1), (1, 3)], axis=-1)
    _untouched(_model([helper.make_node("MatMul", ["x", "W"], ["y"]),
                       helper.make_node("Reshape", ["y", "target"], ["z"]), *nodes], outs,
                      inits + [_c("target", [0, -1, 3])]))


def test_constant_factors_that_do_not_split_the_width_are_left_alone():
    """[B, S, 12] -> [-1, 3, 2, 2] cuts W's columns in three; [-1, 3, 1, 2] (3*1*2 = 6) does not:
    each of its rows holds half a row of the product."""
    def model(target: list[int]) -> ir.Model:
        return _model([helper.make_node("MatMul", ["x", "W"], ["y"]),
                       helper.make_node("Reshape", ["y", "target"], ["z"]),
                       helper.make_node("Split", ["z", "ones"], ["q", "k", "v"], axis=-3),
                       *_relus("qkv")], ["o0", "o1", "o2"],
                      [_c("target", target), _c("ones", [1, 1, 1])])

    assert _unfused(model([-1, 3, 2, 2])) == 1
    _untouched(model([-1, 3, 1, 2]))


def test_a_run_time_factor_after_other_leading_dims_is_left_alone():
    """[B, S, 12] -> [S, B, 3, -1, 2]: the -1 is 2 again, but the leading dims are not the
    product's (S, B swapped), so a factor is not a window of W's columns."""
    _untouched(_stacked("sb", [3, -1, 2]))


# -- real exports ----------------------------------------------------------------------------

def _randomize(model, seed: int = 0):
    """Random weights, biases and norm scales, all different (exporters share equal constants)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, base = (0.15, 0.0) if p.ndim >= 2 else (0.1, 1.0 if "norm" in name.lower()
                                                           or name.endswith("weight") else 0.0)
            p.copy_(base + torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _family(name: str):
    """A tiny transformers model (2 layers, hidden 64, 4 heads of 16, MLP 96), default attention."""
    import transformers

    common = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                                      n_positions=64)
        return transformers.GPT2Model(cfg), {"use_cache": False}
    if name == "phi3":
        cfg = transformers.Phi3Config(hidden_size=64, num_key_value_heads=2, pad_token_id=0,
                                      **common)
        return transformers.Phi3Model(cfg), {"use_cache": False}
    cfg = transformers.ModernBertConfig(hidden_size=64, global_attn_every_n_layers=2,
                                        local_attention=8, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=1, cls_token_id=1, sep_token_id=1, **common)
    return transformers.ModernBertModel(cfg), {}


_EXPORTS: dict[tuple[str, str], ir.Model] = {}


def _export(name: str, exporter: str, tmp_path_factory) -> ir.Model:
    """The family exported with dynamic batch and sequence axes, once per session."""
    import torch

    if (name, exporter) not in _EXPORTS:
        module, extra = _family(name)
        torch.manual_seed(0)
        module = _randomize(module)

        class Wrapper(torch.nn.Module):  # keyword call, one output
            def __init__(self):
                super().__init__()
                self.model = module

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  **extra).last_hidden_state

        ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        args = (ids, torch.ones(2, 16, dtype=torch.int64))
        names = ["input_ids", "attention_mask"]
        path = tmp_path_factory.mktemp("fused") / f"{name}_{exporter}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(Wrapper(), args, str(path), input_names=names,
                                  output_names=["out"], opset_version=17, dynamo=False,
                                  dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
            else:
                dims = (torch.export.Dim("batch", max=512), torch.export.Dim("sequence", max=64))
                prog = torch.onnx.export(Wrapper(), args, input_names=names, output_names=["out"],
                                         dynamic_shapes=({0: dims[0], 1: dims[1]},) * 2,
                                         opset_version=18, dynamo=True, verbose=False)
                prog.save(str(path))
        _EXPORTS[(name, exporter)] = graph.normalize(ir.load(str(path)))
    return graph.copy_model(_EXPORTS[(name, exporter)])


def _tokens(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, -(seq // 4):] = 0
    return {"input_ids": rng.integers(2, 128, (batch, seq)), "attention_mask": mask}


#: family -> fused products per export (per layer: GPT-2 c_attn; Phi-3 qkv_proj and gate_up_proj;
#: ModernBERT Wqkv and Wi)
FUSED = {"gpt2": 2, "phi3": 4, "modernbert": 4}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(FUSED))
def test_real_fused_projections_are_split_exactly(name, exporter, tmp_path_factory):
    """GPT-2's c_attn (Gemm + Reshape in TorchScript, MatMul + Add in dynamo), Phi-3's qkv_proj
    (Slices) and gate_up_proj (run-time chunk bounds / Split), ModernBERT's Wqkv (Reshape into
    three factors) and Wi (chunk): all split, the graph computing what it computed, with its
    batch and sequence axes still dynamic."""
    m = _export(name, exporter, tmp_path_factory)
    inputs = [(v.name, v.shape) for v in m.graph.inputs]
    assert _unfused(m, _tokens) == FUSED[name]
    assert [(v.name, v.shape) for v in m.graph.inputs] == inputs
    fused = {"gpt2": 192, "phi3": 128, "modernbert": 192}[name]
    assert fused not in _widths(m) and 2 * 96 not in _widths(m)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["gpt2", "modernbert"])
def test_heads_and_neurons_of_split_projections_are_found(name, exporter, tmp_path_factory):
    m = _export(name, exporter, tmp_path_factory)
    split_fused_projections(m)
    s = analysis.analyze_graph(m, probe.probe(m, _tokens(2, 16)))
    assert [(b.kind, b.n_units) for b in s.blocks] == [("attention", 4), ("mlp", 96)] * 2


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_phi3_split_projections_give_neurons_and_grouped_heads(exporter, tmp_path_factory):
    """Phi-3's 4 query heads share 2 KV heads (grouped-query attention): through the split
    qkv_proj, one unit is a KV head with its query heads; through the split gate_up_proj, one
    neuron is a column of gate and of up."""
    m = _export("phi3", exporter, tmp_path_factory)
    split_fused_projections(m)
    s = analysis.analyze_graph(m, probe.probe(m, _tokens(2, 16)))
    assert [(b.kind, b.n_units) for b in s.blocks] == [("attention", 2), ("mlp", 96)] * 2


@pytest.mark.parametrize("name", ["gpt2", "modernbert"])
def test_split_projections_prune_heads_and_neurons_exactly(name, tmp_path_factory):
    """End to end on the TorchScript exports (GPT-2's Gemm + Reshape, ModernBERT's three
    factors and chunked GeGLU): heads and neurons pruned, the result verified."""
    from optin_onnx.pipeline import prune

    m = _export(name, "torchscript", tmp_path_factory)
    calib = {"input_ids": np.random.default_rng(0).integers(2, 128, (16, 16)),
             "attention_mask": np.ones((16, 16), np.int64)}
    report = prune(m, calib, flops=0.7, samples=8, latency_cases=[]).report
    assert report.verify["passed"]
    lost = {b["kind"] for b in report.layers if b["units_after"] < b["units_before"]}
    assert lost == {"attention", "mlp"}
