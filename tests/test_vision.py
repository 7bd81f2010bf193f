"""Vision transformers (ViT, DeiT, Dinov2 with its layer scale), both exporters, dynamic batch:
the analysis finds every head and MLP neuron, slicing equals masking (a removed block included),
the trajectory feature of pre-LN models is the LayerNorm'ed residual stream, and ``prune()`` runs
end to end on a tiny ViT classifier."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optin_onnx.report import render
from optin_onnx import analysis, graph, instrument, probe, rewrite
from optin_onnx.calibrate import make_calibration
from optin_onnx.pipeline import PruneOptions, analyze, prune
from optin_onnx.scoring.teacher import Objective
from optin_onnx.scoring.trajectory import ScoreConfig, score_fast, score_naive
from tests.helpers import load_analyze, run

FAMILIES = ("vit", "vit-classifier", "deit-classifier", "dinov2")
EXPORTERS = ("torchscript", "dynamo")
FORMS = list(itertools.product(FAMILIES, EXPORTERS))
MLP_WIDTH = {"dinov2": 64}  # Dinov2's config takes an integer MLP ratio: 32 * 2


def form_id(form) -> str:
    return "-".join(form)


@pytest.fixture(scope="module")
def vision_exports(tmp_path_factory) -> dict[tuple[str, str], str]:
    """{(family, exporter): path}: every tiny vision model, exported once (about 10 s)."""
    from models import vision

    root = tmp_path_factory.mktemp("vision_exports")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family, exporter in FORMS:
            module = vision.VisionWrapper(vision.tiny_vision(family, seed=0))
            out[(family, exporter)] = str(vision.export(module, root / f"{family}_{exporter}.onnx",
                                                        exporter=exporter))
    return out


def images(n: int, seed: int = 0) -> np.ndarray:
    from models import vision

    return vision.calibration_images(n, 32, seed=seed)


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_analysis_finds_heads_and_mlp_neurons(vision_exports, form):
    m, s = load_analyze(vision_exports[form])
    assert not s.declined, [f"{d.name}: {d.reasons}" for d in s.declined]
    assert s.n_layers == 2
    width = MLP_WIDTH.get(form[0], 48)
    assert [(b.name, b.n_units, b.unit_size) for b in s.blocks] == [
        ("layer0.attention", 4, 8), ("layer0.mlp", width, 1),
        ("layer1.attention", 4, 8), ("layer1.mlp", width, 1)]
    assert all(b.removal is not None for b in s.blocks), "every block must be removable"
    if form[0] == "dinov2":  # the layer scale sits between each consumer and its residual add
        assert all(len(b.removal.scale_uses) == 1 for b in s.blocks)
    assert analysis.pre_layer_norm(m, s)
    # The batch axis stays dynamic.
    dim = ir.to_proto(m).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value


def random_keep(s: analysis.Structure, removed: str, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    keep = {}
    for b in s.blocks:
        n = 0 if b.name == removed else int(rng.integers(1, b.n_units))
        keep[b.name] = sorted(rng.choice(b.n_units, n, replace=False).tolist())
    return keep


@pytest.mark.parametrize("form", [f for f in FORMS if f[0] in ("vit-classifier", "dinov2")],
                         ids=form_id)
@pytest.mark.parametrize("removed", ["layer0.attention", "layer1.mlp"])
def test_sliced_equals_masked_with_a_removed_block(vision_exports, form, removed):
    m, s = load_analyze(vision_exports[form])
    keep = random_keep(s, removed, seed=len(removed))
    sliced = ir.to_proto(rewrite.rewrite(m, s, keep))
    onnx.checker.check_model(sliced, full_check=True)
    masks = {b.name: np.isin(np.arange(b.n_units), keep[b.name]).astype(np.float32)
             for b in s.blocks}
    masked = instrument.masked_model(m, s, masks)
    names = {n.name for n in sliced.graph.node}
    gone = next(b for b in s.blocks if b.name == removed)
    assert not {c.node for c in gone.consumers} & names, "the emptied block is still there"
    for batch in (1, 3):
        feeds = {"pixel_values": images(batch, seed=batch)}
        want, got, dense = run(masked, feeds)[0], run(sliced, feeds)[0], run(m, feeds)[0]
        assert got.shape == dense.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"batch {batch}")
        assert np.abs(dense - got).max() > 1e-3, "pruning had no visible effect"


def test_dinov2_layer_scale_removal_scales_the_bias(vision_exports):
    """Removing Dinov2's MLP leaves scale * bias in the residual add (and nothing else)."""
    m, s = load_analyze(vision_exports[("dinov2", "torchscript")])
    block = next(b for b in s.blocks if b.name == "layer0.mlp")
    r = block.removal
    nodes = graph.nodes_by_name(m.graph)
    const = lambda n, i: graph.const_array(nodes[n].inputs[i])  # noqa: E731
    assert len(r.bias_uses) == 1 and len(r.scale_uses) == 1
    (sn, si, after, inverse), (bn, bi) = r.scale_uses[0], r.bias_uses[0]
    assert after == 1 and not inverse
    np.testing.assert_allclose(r.constant(const), const(bn, bi) * const(sn, si), rtol=1e-6)
    sliced = rewrite.rewrite(m, s, {"layer0.mlp": []})
    add = graph.nodes_by_name(sliced.graph)[r.node]
    np.testing.assert_allclose(graph.const_array(add.inputs[r.input_index]),
                               const(bn, bi) * const(sn, si), rtol=1e-6)
    masked = instrument.masked_model(m, s, {"layer0.mlp": np.zeros(block.n_units, np.float32)})
    feeds = {"pixel_values": images(2)}
    np.testing.assert_allclose(run(sliced, feeds)[0], run(masked, feeds)[0], atol=1e-4, rtol=0)


def test_feature_kind_auto_is_residual_ln_for_vit_and_ffn_for_bert(vision_exports, tmp_path):
    from models import text_encoders as te

    m, s = analyze(vision_exports[("vit-classifier", "dynamo")])
    cal = make_calibration({"pixel_values": images(2)})
    obj = Objective(m, s, cal, ScoreConfig())
    assert obj.feature_kind == "residual-ln"
    nodes = graph.nodes_by_name(m.graph)
    # F after layer 0 is what layer 1's Q/K/V read; after the last layer, the final LayerNorm.
    att1 = next(b for b in s.blocks if b.name == "layer1.attention")
    assert obj.layer_feature[0] == nodes[att1.sources[0]].inputs[0].name
    assert obj.layer_feature[1] == next(n for n in reversed(list(m.graph))
                                        if n.op_type == "LayerNormalization").outputs[0].name
    assert obj.features_for(s.blocks[0]) == [obj.layer_feature[0], obj.layer_feature[1]]
    assert obj.features_for(s.blocks[-1]) == [obj.layer_feature[1]]
    ffn = Objective(m, s, cal, ScoreConfig(feature_kind="ffn"))
    assert ffn.layer_feature == {b.layer: b.feature for b in s.blocks if b.kind == "mlp"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = te.export(te.EncoderWrapper(te.tiny_bert(), head="classifier"), tmp_path / "b.onnx")
    bm, bs = analyze(bert)
    from tests.helpers import tiny_feeds

    assert Objective(bm, bs, make_calibration(tiny_feeds(2, 8)), ScoreConfig()).feature_kind == "ffn"


def test_fast_scorer_equals_naive_with_residual_ln(vision_exports):
    m, s = analyze(vision_exports[("vit-classifier", "torchscript")])
    cal = make_calibration({"pixel_values": images(6, seed=3)}, chunk_size=4)
    cfg = ScoreConfig(tokens=60, candidates_per_run=3, feature_kind="residual-ln")
    only = {b.name: list(range(0, b.n_units, 1 if b.kind == "attention" else 5)) for b in s.blocks}
    fast, naive = score_fast(m, s, cal, cfg, only=only), score_naive(m, s, cal, cfg, only=only)
    for term in ("importance", "md", "kd"):
        for b in s.blocks:
            f, n = getattr(fast, term)[b.name], getattr(naive, term)[b.name]
            idx = only[b.name]
            scale = np.abs(n[idx]).max()
            assert scale > 0, f"{term} of {b.name} is all zero"
            assert np.abs(f[idx] - n[idx]).max() <= 1e-5 * scale, f"{term} of {b.name}"


def test_prune_vit_classifier_end_to_end(vision_exports, tmp_path):
    calib = {"pixel_values": images(10, seed=5)}
    opt = PruneOptions(flops=0.6, samples=8, latency_cases=(), simplify="off", neuron_group=4)
    result = prune(vision_exports[("vit-classifier", "torchscript")], calib, opt,
                   output=tmp_path / "slim.onnx")
    assert result.verification.passed
    assert abs(result.report.flops_achieved - 0.6) <= 0.01, result.report.flops_achieved
    assert result.report.seq_len == 0  # pixel_values has no sequence axis
    assert "sequence length" not in render(result.report)
    assert any(len(k) < b.n_units for b in result.structure.blocks
               for k in [result.selection.keep[b.name]])
    slim = onnx.load(str(tmp_path / "slim.onnx"))
    for batch in (1, 4):
        out = run(slim, {"pixel_values": images(batch, seed=9)})[0]
        assert out.shape == (batch, 5)


def test_feature_flag_reaches_the_options(vision_exports):
    from optin_onnx.cli import _parser
    from optin_onnx.errors import OptinError

    args = _parser().parse_args(["prune", "a.onnx", "b.onnx", "--calib", "c.npz",
                                 "--feature", "residual-ln"])
    assert args.feature_kind == "residual-ln"
    assert _parser().parse_args(["prune", "a", "b", "--calib", "c"]).feature_kind == "auto"
    m, s = analyze(vision_exports[("vit", "torchscript")])
    with pytest.raises(OptinError, match="feature kind"):
        Objective(m, s, make_calibration({"pixel_values": images(2)}),
                  ScoreConfig(feature_kind="bogus"))


@pytest.mark.parametrize("family", ["deit-classifier", "dinov2"])
def test_onnxsim_fused_qkv_is_split_back_and_pruned(vision_exports, family, tmp_path):
    """onnxsim fuses Q/K/V into MatMul -> Split (and writes the head count as a constant Reshape
    target): the fused projection is split back, the heads are found, and pruning stays exact."""
    from models.text_encoders import simplify
    from optin_onnx.passes.unfuse_projections import split_fused_projections

    path = simplify(vision_exports[(family, "dynamo")], tmp_path / "sim.onnx")
    m = graph.normalize(ir.load(str(path)))
    assert any(n.op_type == "Split" for n in m.graph)
    feeds = {"pixel_values": images(3, seed=5)}
    before = run(m, feeds)
    assert split_fused_projections(m) == 2
    assert not any(n.op_type == "Split" for n in m.graph)
    for a, b in zip(before, run(m, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    s = analysis.analyze_graph(m, probe.probe(m))
    assert [(b.kind, b.n_units) for b in s.blocks if b.kind == "attention"] == [("attention", 4)] * 2
    result = prune(path, {"pixel_values": images(12)}, flops=0.6, samples=8, latency_cases=[],
                   output=tmp_path / "slim.onnx")
    assert result.report.verify["passed"]
    assert any("fused projections" in n for n in result.report.notes)
    assert min(x["units_after"] for x in result.report.layers if x["kind"] == "attention") >= 1


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dense_decoder_after_the_backbone(tmp_path, exporter):
    """Dinov2 + a 1x1-conv decoder on the patch-token map: heads and MLP neurons are found as
    without the decoder, the decoder's hidden channels are a channel group, the transformer keeps
    its residual-ln trajectory, and the whole model prunes and verifies."""
    from models import vision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = vision.DenseDecoderWrapper(vision.tiny_vision("dinov2", seed=0))
        path = vision.export(module, tmp_path / "dec.onnx", exporter=exporter)
    m, structure = load_analyze(path)
    kinds = [(b.kind, b.n_units) for b in structure.blocks]
    assert kinds == [("attention", 4), ("mlp", 64), ("attention", 4), ("mlp", 64),
                     ("channels", 16)]
    cal = make_calibration({"pixel_values": images(6)})
    assert Objective(m, structure, cal, ScoreConfig()).feature_kind == "residual-ln"
    result = prune(path, {"pixel_values": images(12)}, flops=0.7, latency_cases=(),
                   channel_multiple=4)
    assert result.verification.passed
    assert result.report.flops_achieved <= 0.7 + 1e-9
    assert run(result.model, {"pixel_values": images(2)})[0].shape == (2, 3, 4, 4)
