"""CNN channel groups: analysis, masked == sliced, scoring, search and the whole pipeline.

The coverage nets come from ``models.cnn`` (a ResNet with downsampling shortcuts, a MobileNet-like
net with depthwise conv, squeeze-excite, channel Concat, Flatten of a 4x4 map); synthetic graphs
cover what exporters rarely write (NHWC layouts, grouped convs, ops that mix channels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.flops import mac_model, total_macs
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.pipeline import analyze, prune
from optin_onnx.rewrite import rewrite
from optin_onnx.scoring.baselines import score_magnitude
from optin_onnx.scoring.liveness import block_points
from optin_onnx.scoring.fast import score_rank_k
from optin_onnx.scoring.masked import score_masked
from optin_onnx.scoring.trajectory import ScoreConfig, fast_scorer, score_fast, score_naive
from optin_onnx.search import search
from tests.helpers import run

NETS = [(kind, exporter, keep_bn) for kind in ("resnet", "mobilenet")
        for exporter, keep_bn in (("torchscript", False), ("torchscript", True), ("dynamo", False))]


def net_id(net) -> str:
    kind, exporter, keep_bn = net
    return f"{kind}-{exporter}" + ("-bn" if keep_bn else "")


@pytest.fixture(scope="module")
def tiny_cnns(tmp_path_factory) -> dict[tuple[str, str, bool], Path]:
    from models.cnn import export_tiny_cnn

    out = tmp_path_factory.mktemp("cnn")
    return {net: export_tiny_cnn(out / f"{net_id(net)}.onnx", net[0], net[1], keep_bn=net[2])
            for net in NETS}


def images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def random_keep(structure: Structure, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {b.name: sorted(rng.choice(b.n_units, rng.integers(1, b.n_units), replace=False)
                           .tolist()) for b in structure.blocks}


# -- analysis -----------------------------------------------------------------------------------

@pytest.mark.parametrize("net", NETS, ids=net_id)
def test_analysis_finds_the_channel_groups(tiny_cnns, net) -> None:
    model, structure = analyze(tiny_cnns[net])
    assert not structure.declined, [f"{d.name}: {d.reasons}" for d in structure.declined]
    assert {b.kind for b in structure.blocks} == {"channels"}
    widths = sorted(b.n_units for b in structure.blocks)
    if net[0] == "resnet":
        # stem + identity block (one residual stream, 8), two block-internal groups (8, 16, 24)
        # ... each downsampling block's output stream ties its body and shortcut convs.
        assert widths == [8, 8, 16, 16, 24, 24]
        stream = next(b for b in structure.blocks if b.n_units == 8 and len(b.consumers) > 1)
        ops = [n.op_type for n in model.graph if n.name in stream.sources]
        assert ops == ["Conv", "Conv"]  # the stem and the identity block's second conv
        # read by block 1's first conv, block 2's first conv and block 2's shortcut conv
        assert len(stream.consumers) == 3
    else:
        # stem 8, SE hidden 4, the stride-2 conv 12 (read by the classifier through Flatten),
        # and the two Concat'ed branches (8 + 8), which the residual after the concat, the
        # squeeze-excite gate and the pointwise conv all write into at their offsets.
        assert widths == [4, 8, 8, 8, 12]
        classifier = [b for b in structure.blocks if any(c.repeat > 1 for c in b.consumers)]
        assert len(classifier) == 1 and classifier[0].consumers[0].repeat == 16
        branches = [b for b in structure.blocks if b.attr_edits]  # the depthwise conv's group
        assert len(branches) == 2
        assert sorted({c.offset for b in branches for c in b.consumers}) == [0, 8]
        depthwise = branches[0].attr_edits[0].node  # one axis, the two branches' channels summed
        assert structure.mac_factors[depthwise] == [(tuple(sorted(b.name for b in branches)), 0)]


@pytest.mark.parametrize("net", NETS, ids=net_id)
def test_masked_equals_sliced(tiny_cnns, net) -> None:
    model, structure = analyze(tiny_cnns[net])
    x = images(3)
    for seed in range(3):
        keep = random_keep(structure, seed)
        slim = ir.to_proto(rewrite(model, structure, keep))
        onnx.checker.check_model(slim, full_check=True)
        reference = masked_model(model, structure, unit_masks(structure, keep))
        for batch in (1, 3):
            want = run(reference, {"input": x[:batch]}, optimize=False)[0]
            got = run(slim, {"input": x[:batch]}, optimize=False)[0]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        # Weights really shrank: parameters fall with the kept channels.
        dense_params = sum(t.const_value.size for t in model.graph.initializers.values())
        slim_params = sum(int(np.prod(t.dims)) for t in slim.graph.initializer)
        assert slim_params < dense_params


def test_mask_input_model_matches_constant_masks(tiny_cnns) -> None:
    model, structure = analyze(tiny_cnns[("mobilenet", "torchscript", False)])
    keep = random_keep(structure, 7)
    masks = unit_masks(structure, keep)
    x = images(2)
    want = run(masked_model(model, structure, masks), {"input": x})[0]
    feeds = {"input": x, **{f"optin_mask__{b.name}": np.repeat(masks[b.name], b.unit_size)
                            for b in structure.blocks}}
    got = run(masked_model(model, structure), feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


# -- synthetic graphs -----------------------------------------------------------------------------

def _model(nodes, inits, x_shape=(None, 3, 8, 8), out="y", opset=17) -> ir.Model:
    rng = np.random.default_rng(0)
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, shape,
                                       rng.standard_normal(shape).astype(np.float32).ravel())
                    if not isinstance(shape, np.ndarray) else onnx.numpy_helper.from_array(shape, name)
                    for name, shape in inits.items()]
    dims = ["N" if d is None else d for d in x_shape]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "k"])],
        initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.from_proto(proto)


def _conv_chain(middle: list, extra_inits: dict) -> ir.Model:
    """x -> Conv(8) -> <middle: 'a' to 'b'> -> Conv(4) -> GAP -> Flatten -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             *middle,
             helper.make_node("Conv", ["b", "w2"], ["c"], name="c2", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["d"], name="gap"),
             helper.make_node("Flatten", ["d"], ["e"], name="flat"),
             helper.make_node("Gemm", ["e", "fc"], ["y"], name="fc", transB=1)]
    return _model(nodes, {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (4, 8, 1, 1), "fc": (5, 4),
                          **extra_inits})


def _analyze(model: ir.Model) -> tuple[ir.Model, Structure]:
    return analyze(ir.to_proto(model))


def test_nhwc_layout_is_followed_through_transposes() -> None:
    """tf2onnx-style: Transpose to NHWC after each conv, per-channel constants on the last axis
    (a folded BatchNorm), Transpose back before the next conv."""
    middle = [helper.make_node("Transpose", ["a"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
              helper.make_node("Mul", ["t", "scale"], ["m"], name="bn_scale"),
              helper.make_node("Add", ["m", "shift"], ["s"], name="bn_shift"),
              helper.make_node("Relu", ["s"], ["r"], name="relu"),
              helper.make_node("Transpose", ["r"], ["b"], name="to_nchw", perm=[0, 3, 1, 2])]
    model = _conv_chain(middle, {"scale": (8,), "shift": (8,)})
    m, structure = _analyze(model)
    first = next(b for b in structure.blocks if b.n_units == 8)
    assert {s.node for s in first.slices} >= {"bn_scale", "bn_shift", "c1", "c2"}
    keep = {first.name: [0, 3, 5, 6]}
    slim = rewrite(m, structure, keep)
    x = images(2, size=8)
    want = run(masked_model(m, structure, {first.name: unit_masks(structure, {
        **{b.name: list(range(b.n_units)) for b in structure.blocks}, **keep})[first.name]}),
        {"x": x})[0]
    np.testing.assert_allclose(run(slim, {"x": x})[0], want, atol=1e-5)


@pytest.mark.parametrize("middle, inits, reason", [
    ([helper.make_node("Conv", ["a", "wg"], ["b"], name="grouped", group=2, kernel_shape=[1, 1])],
     {"wg": (8, 4, 1, 1)}, "grouped Conv 'grouped'"),
    ([helper.make_node("LRN", ["a"], ["b"], name="lrn", size=3)], {}, "no handler for op LRN"),
    ([helper.make_node("Pad", ["a", "pads"], ["b"], name="pad")],
     {"pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "w2": (4, 10, 1, 1)},
     "Pad 'pad' pads the axis"),
    ([helper.make_node("Softmax", ["a"], ["b"], name="sm", axis=1)], {},
     "Softmax 'sm' normalises over the axis"),
    ([helper.make_node("ReduceMean", ["a"], ["r"], name="rm", axes=[1], keepdims=1),
      helper.make_node("Sub", ["a", "r"], ["b"], name="sub")], {},
     "ReduceMean 'rm' reduces over the axis"),
])
def test_ops_that_mix_channels_are_barriers(middle, inits, reason) -> None:
    _, structure = _analyze(_conv_chain(middle, inits))
    assert all(b.n_units != 8 for b in structure.blocks)
    declined = [r for d in structure.declined for r in d.reasons]
    assert any(reason in r for r in declined), declined


def test_pad_of_spatial_axes_and_pools_keep_the_group() -> None:
    middle = [helper.make_node("Pad", ["a", "pads"], ["p"], name="pad"),
              helper.make_node("MaxPool", ["p"], ["q"], name="pool", kernel_shape=[2, 2]),
              helper.make_node("Clip", ["q", "lo", "hi"], ["b"], name="relu6")]
    model = _conv_chain(middle, {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
                                 "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    _, structure = _analyze(model)
    assert sorted(b.n_units for b in structure.blocks) == [4, 8]


# -- FLOPs, search ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_predicted_macs_are_the_slim_graphs(tiny_cnns, kind) -> None:
    """A conv between two groups costs the product of their widths; after a channel Concat the
    joined groups' widths add up (the MobileNet's depthwise and pointwise convs)."""
    model, structure = analyze(tiny_cnns[(kind, "torchscript", False)])
    macs = mac_model(model, structure, 0)
    assert not macs.affine
    for seed in range(3):
        keep = random_keep(structure, seed)
        slim = rewrite(model, structure, keep)
        predicted = macs.macs({k: len(v) for k, v in keep.items()})
        assert predicted == pytest.approx(total_macs(slim, 0), rel=1e-9)


@pytest.mark.parametrize("flops, multiple", [(0.9, 8), (0.7, 8), (0.6, 4), (0.4, 4), (0.3, 1)])
def test_search_rounds_channels_and_never_empties_a_group(tiny_cnns, flops, multiple) -> None:
    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    macs = mac_model(model, structure, 0)
    scores = score_magnitude(model, structure).importance
    result = search(structure, scores, macs, flops, channel_multiple=multiple)
    for b in structure.blocks:
        kept = len(result.keep[b.name])
        assert kept >= min(multiple, b.n_units)
        assert kept % multiple == 0 or kept == b.n_units
    assert result.fraction <= flops + 1e-9
    assert result.fraction == pytest.approx(
        total_macs(rewrite(model, structure, result.keep), 0) / macs.total, rel=1e-9)
    # The channels dropped from a group are its least important ones.
    for b in structure.blocks:
        dropped = sorted(set(range(b.n_units)) - set(result.keep[b.name]))
        if dropped:
            assert max(scores[b.name][dropped]) <= min(scores[b.name][result.keep[b.name]])


def test_impossible_channel_budget_is_refused(tiny_cnns) -> None:
    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    macs = mac_model(model, structure, 0)
    scores = score_magnitude(model, structure).importance
    with pytest.raises(OptinError, match="impossible.* keeps 0.618"):
        search(structure, scores, macs, 0.6)  # every group is at least 8 channels wide already
    with pytest.raises(OptinError, match="impossible"):
        search(structure, scores, macs, 0.01, channel_multiple=1)


# -- scoring ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
@pytest.mark.parametrize("group", [1, 4])
def test_fast_scores_equal_naive(tiny_cnns, kind, group) -> None:
    model, structure = analyze(tiny_cnns[(kind, "torchscript", False)])
    cal = make_calibration({"input": images(6, seed=1)}, chunk_size=4)
    cfg = ScoreConfig(neuron_group=group, tokens=64)
    fast = score_fast(model, structure, cal, cfg)
    naive = score_naive(model, structure, cal, cfg)
    top = max(np.abs(v).max() for v in naive.importance.values())
    for name in naive.importance:
        np.testing.assert_allclose(fast.importance[name], naive.importance[name], atol=1e-5 * top)
    assert all(np.all(np.isfinite(v)) for v in fast.importance.values())


@pytest.mark.parametrize("group,teacher", [(1, "dense"), (4, "dense"), (4, "current")])
def test_fast_scores_equal_naive_on_a_base_selection(tiny_cnns, group, teacher) -> None:
    """Iterative rounds score on top of an earlier selection: the same numbers both ways, and
    dropped channels are no candidates."""
    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    cal = make_calibration({"input": images(6, seed=1)}, chunk_size=4)
    cfg = ScoreConfig(neuron_group=group, tokens=64, teacher=teacher)
    base = random_keep(structure, seed=3)
    fast = score_fast(model, structure, cal, cfg, base=base)
    naive = score_naive(model, structure, cal, cfg, base=base)
    top = max(np.nanmax(np.abs(v)) for v in naive.importance.values())
    for b in structure.blocks:
        f, n = fast.importance[b.name], naive.importance[b.name]
        alive = base[b.name]
        assert np.all(np.isnan(np.delete(f, alive))) and np.all(np.isfinite(f[alive]))
        np.testing.assert_allclose(f[alive], n[alive], atol=1e-5 * top)


def test_channel_groups_get_the_masked_scorer_and_the_rank_k_one_refuses_them(tiny_cnns) -> None:
    """A channel group has several consumers, so no single output to apply a rank-k update to:
    the masked scorer takes the structure, and the rank-k scorer says why it cannot."""
    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    assert fast_scorer(structure) is score_masked
    cal = make_calibration({"input": images(2)}, chunk_size=2)
    with pytest.raises(OptinError, match="consumers"):
        score_rank_k(model, structure, cal)


def test_block_outputs_are_the_values_everything_passes_through(tiny_cnns) -> None:
    """ResNet: the input of every block (after the stem and after each residual Add's ReLU) and
    the pooled feature; never a value inside a block, where the shortcut runs beside it."""
    from optin_onnx.scoring.masked import MaskedModel

    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    cal = make_calibration({"input": images(2)}, chunk_size=2)
    mm = MaskedModel(model, structure, cal, ScoreConfig())
    points, first = block_points(mm.proto, structure, mm.dtypes)
    producers = {o: n for n in mm.proto.graph.node for o in n.output}
    inputs = [producers[producers[p.name].input[0]].op_type for p in points]
    assert inputs == ["Relu", "Relu", "Relu", "Flatten"]  # stem, blocks 1-2, pooled feature
    assert set(first) == {b.name for b in structure.blocks}
    # A group's own output, as the next layer sees it, is the first point of its trajectory.
    stem = structure.blocks[0]
    assert mm.obj.features_for(stem) == [p.name for p in points]
    assert mm.obj.features_for(structure.blocks[-1]) == [points[-1].name]


# -- the pipeline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["optin", "magnitude"])
def test_prune_end_to_end(tiny_cnns, tmp_path, method) -> None:
    path = tiny_cnns[("resnet", "dynamo", False)]
    out = tmp_path / "slim.onnx"
    result = prune(path, {"input": images(24, seed=2)}, flops=0.6, method=method, output=out,
                   latency_cases=((1, 0),), latency_seconds=0.2, samples=16, channel_multiple=4)
    report = result.report
    assert report.flops_achieved <= 0.6 + 1e-9
    assert report.params_after < report.params_before
    assert result.verification.passed and result.verification.cases == ["1", "3"]
    assert {row["kind"] for row in report.layers} == {"channels"}
    slim = onnx.load(out)
    assert slim.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stays dynamic
    assert run(slim, {"input": images(5)})[0].shape == (5, 10)


def test_cli_analyze_prints_channel_groups_and_barriers(tiny_cnns, tmp_path, capsys,
                                                        monkeypatch) -> None:
    from optin_onnx.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["analyze", str(tiny_cnns[("mobilenet", "torchscript", False)])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "written by" in out and "read by" in out
    assert all(f"layer{i}.channels" in out for i in range(5))
    assert "1 depthwise; concat at 0" in out and "concat at 8" in out and "flattened x16" in out

    # A channel-mixing op on a group's axis: the group is declined, and the reason is printed.
    middle = [helper.make_node("LRN", ["a"], ["b"], name="lrn", size=3)]
    path = tmp_path / "lrn.onnx"
    onnx.save(ir.to_proto(_conv_chain(middle, {})), path)
    assert main(["analyze", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "declined group@c1: no handler for op LRN ('lrn')" in out


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_image_size_survives_and_is_verified(tmp_path, exporter) -> None:
    import torch

    from models.cnn import export, tiny_cnn

    path = export(tiny_cnn("resnet"), tmp_path / "dyn.onnx", torch.zeros(2, 3, 32, 32), exporter,
                  dynamic_image=True)
    result = prune(path, {"input": images(16, seed=3)}, flops=0.7, latency_cases=(),
                   channel_multiple=4)
    assert result.verification.cases == ["1", "3", "3 +32px"] and result.verification.passed
    for size in (32, 64):  # the slim model runs at any size, like the dense one
        assert run(result.model, {"input": images(2, size=size)})[0].shape == (2, 10)


def test_channel_first_features_sample_the_same_rows_as_a_transpose(tiny_cnns) -> None:
    """Token rows of an [N, C, H, W] feature are (sample, position) pairs with the C channels as
    the vector: picked without transposing the whole map, they equal the transposed rows."""
    from optin_onnx.scoring.losses import rows
    from optin_onnx.scoring.masked import MaskedModel

    model, structure = analyze(tiny_cnns[("resnet", "torchscript", False)])
    cal = make_calibration({"input": images(5)}, chunk_size=2)
    mm = MaskedModel(model, structure, cal, ScoreConfig(tokens=50))
    name = mm.obj.points[0].name
    chunks = [{name: np.random.default_rng(c.start).standard_normal((c.stop - c.start, 8, 4, 3))
               .astype(np.float32)} for c in cal.chunks]
    got = mm.obj.gather(name, chunks)
    sample = mm.obj._plain[12]
    want = np.concatenate([rows(np.moveaxis(v[name], 1, -1))[sample.rows_in_chunk(c.start, c.stop,
                                                                                  12)[1]]
                           for c, v in zip(cal.chunks, chunks)])
    assert got.shape == (50, 8)
    np.testing.assert_array_equal(got, want)


def test_split_of_a_channel_axis_makes_one_group_per_window() -> None:
    """conv(16) -> Split [6, 10] -> (conv(8) | depthwise) -> Concat -> conv: the windows are
    groups of their own (the first conv's filters are sliced per window at its offset), the
    Split's sizes follow what each window keeps, and masked == sliced."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Split", ["r", "sizes"], ["s1", "s2"], name="split", axis=1),
             helper.make_node("Conv", ["s1", "w2"], ["u"], name="c2", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["s2", "wd"], ["v"], name="dw", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], group=10),
             helper.make_node("Concat", ["u", "v"], ["w"], name="cat", axis=1),
             helper.make_node("Conv", ["w", "w3"], ["c"], name="c3", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["d"], name="gap"),
             helper.make_node("Flatten", ["d"], ["e"], name="flat"),
             helper.make_node("Gemm", ["e", "fc"], ["y"], name="fc", transB=1)]
    model = _model(nodes, {"w1": (16, 3, 1, 1), "sizes": np.array([6, 10], np.int64),
                           "w2": (8, 6, 1, 1), "wd": (10, 1, 3, 3), "w3": (4, 18, 1, 1),
                           "fc": (5, 4)})
    m, structure = _analyze(model)
    assert not structure.declined
    widths = sorted(b.n_units for b in structure.blocks)
    assert widths == [4, 6, 8, 10]
    ten = next(b for b in structure.blocks if b.n_units == 10)
    assert [(e.node, e.name) for e in ten.attr_edits] == [("dw", "group")]
    assert {(s.node, s.offset) for s in ten.slices} >= {("c1", 6), ("c3", 8)}
    x = images(3, size=8)
    for seed in range(4):
        keep = random_keep(structure, seed)
        slim = rewrite(m, structure, keep)
        onnx.checker.check_model(ir.to_proto(slim), full_check=True)
        want = run(masked_model(m, structure, unit_masks(structure, keep)), {"x": x})[0]
        np.testing.assert_allclose(run(slim, {"x": x})[0], want, atol=1e-5)
    macs = mac_model(m, structure, 0)
    assert macs.macs({k: len(v) for k, v in keep.items()}) == pytest.approx(total_macs(slim, 0))


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_reconstruct_corrects_channel_groups_read_by_one_matrix_product(tiny_cnns, kind) -> None:
    """Least-squares scales where a group's one consumer is a 1x1 conv or a Gemm; groups with
    several consumers or a 3x3 consumer are left whole and say why; the fits lower their loss."""
    from optin_onnx.reconstruct import reconstruct

    model, structure = analyze(tiny_cnns[(kind, "torchscript", False)])
    keep = random_keep(structure, 5)
    cal = make_calibration({"input": images(8, seed=4)}, chunk_size=4)
    fixed = reconstruct(model, structure, keep, cal)
    applied = [c for c in fixed.corrections if c.applied]
    assert all(c.loss_after < c.loss_before for c in applied)
    assert [c.block for c in applied] == (["layer5.channels"] if kind == "resnet" else [])
    reasons = {c.block: c.reason for c in fixed.corrections if not c.applied}
    if kind == "resnet":  # the stem stream (3 readers), 3x3 readers, the last stage's stream
        assert reasons["layer0.channels"] == "3 consumers"
        assert reasons["layer1.channels"] == "the consumer is not a 1x1 conv or a matrix product"
    else:  # the Concat'ed branches, the squeeze-excite hidden layer (4 values per image), Flatten
        assert reasons["layer1.channels"] == "3 consumers"
        assert reasons["layer3.channels"] == "singular system"
        assert reasons["layer4.channels"] == "its consumer reads a flattened feature map"
    # Still a plain graph of the same structure: slicing the corrected model stays exact.
    slim = rewrite(fixed.model, structure, keep)
    x = images(2)
    want = run(masked_model(fixed.model, structure, unit_masks(structure, keep)), {"input": x})[0]
    np.testing.assert_allclose(run(slim, {"input": x})[0], want, atol=1e-5)


def test_a_cnn_with_a_hidden_classifier_layer_is_scored_by_block_outputs(tmp_path) -> None:
    """The digit CNNs end in Linear -> ReLU -> Linear: an MLP block, yet no transformer."""
    from optin_onnx.scoring.features import feature_kind

    middle = [helper.make_node("Relu", ["a"], ["b"], name="relu")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[3, 3]),
             *middle,
             helper.make_node("Flatten", ["b"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
             helper.make_node("Gemm", ["hr", "fc2"], ["y"], name="fc2", transB=1)]
    m, structure = _analyze(_model(nodes, {"w1": (8, 3, 3, 3), "fc1": (16, 8 * 6 * 6),
                                           "fc2": (5, 16)}))
    assert sorted(b.kind for b in structure.blocks) == ["channels", "mlp"]
    assert feature_kind(m, structure, "auto") == "blocks"
    assert feature_kind(m, structure, "ffn") == "ffn"  # asked for explicitly: allowed
