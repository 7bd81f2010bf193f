"""Resize / Upsample on conv channel groups (issue 9, vision decoders such as SegFormer's):
each channel is resized on its own, so a channel group passes through where its axis is not
resized; a constant ``sizes`` entry holding the channel count is edited with the group."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from optin_onnx.analysis import analyze_graph
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.pipeline import as_model, prune
from optin_onnx.probe import probe
from optin_onnx.rewrite import rewrite
from tests.helpers import run


def decoder(mode: str, batch: int | str = "N") -> onnx.ModelProto:
    """x -> conv a (8 ch) -> conv b (stride 2, 8 ch) -> Resize to a's size -> Concat with a ->
    1x1 fuse conv -> y. ``mode``: "scales" ([1, 1, 2, 2]), "sizes" (a constant [batch, 8, 16,
    16]: needs a static batch), "channels" (scales [1, 2, 2, 2]: resizes the channel axis)."""
    rng = np.random.default_rng(0)
    inits = []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3)
                                             .astype(np.float32), name))
        return name
    if mode == "sizes":
        inits.append(numpy_helper.from_array(np.array([batch, 8, 16, 16], np.int64), "sizes"))
        resize_in = ["b", "", "", "sizes"]
    else:
        scale = [1, 2, 2, 2] if mode == "channels" else [1, 1, 2, 2]
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scales"))
        resize_in = ["b", "", "scales"]
    nodes = [helper.make_node("Conv", ["x", w("wa", 8, 3, 3, 3), w("ba", 8)], ["a0"],
                              name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a0"], ["a"], name="relu_a"),
             helper.make_node("Conv", ["a", w("wb", 8, 8, 3, 3), w("bb", 8)], ["b0"],
                              name="conv_b", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["b0"], ["b"], name="relu_b"),
             helper.make_node("Resize", resize_in, ["up"], name="up", mode="nearest"),
             helper.make_node("Concat", ["a", "up"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", w("wf", 4, 8 if mode == "channels" else 16, 1, 1)],
                              ["y"], name="fuse")]
    if mode == "channels":  # the channel-resized map has 16 channels: fuse reads it alone
        nodes[5] = helper.make_node("Identity", ["up"], ["cat"], name="cat")
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("x", T.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", T.FLOAT, [batch, 4, 16, 16])], inits)
    if mode == "channels":
        graph.node[6].input[0] = "cat"
        graph.initializer[-1].CopyFrom(numpy_helper.from_array(
            (rng.standard_normal((4, 16, 1, 1)) * 0.3).astype(np.float32), "wf"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def test_upsampled_group_is_pruned_exactly():
    model = decoder("scales")
    result = prune(model, images(24), flops=0.6, latency_cases=[], samples=8, channel_multiple=1)
    assert result.verification.passed
    blocks = {b.name: len(result.selection.keep[b.name]) for b in result.structure.blocks}
    assert len(blocks) == 2 and min(blocks.values()) < 8


def test_constant_sizes_are_edited():
    """sizes [1, 8, 16, 16] names the channel count: sliced with the group, exactly."""
    m = as_model(decoder("sizes", batch=1))
    structure = analyze_graph(m, probe(m, images(1)))
    resized = next(b for b in structure.blocks if "conv_b" in b.sources)
    assert [(e.node, e.offset) for e in resized.shape_edits] == [("up", 1)]
    keep = {b.name: list(range(0, b.n_units, 2)) for b in structure.blocks}
    slim = ir.to_proto(rewrite(m, structure, keep))
    want = run(ir.to_proto(masked_model(m, structure, unit_masks(structure, keep))), images(1, 3))
    np.testing.assert_allclose(run(slim, images(1, 3))[0], want[0], atol=1e-5)


def test_resizing_the_channel_axis_is_a_barrier():
    m = as_model(decoder("channels"))
    structure = analyze_graph(m, probe(m, images(2)))
    assert not any("conv_b" in b.sources for b in structure.blocks)
    assert any("Resize 'up' resizes the axis" in r for d in structure.declined for r in d.reasons)


@pytest.mark.parametrize("mode", ["scales", "sizes"])
def test_sizes_or_scales_only(mode):
    m = as_model(decoder(mode, batch=1 if mode == "sizes" else "N"))
    structure = analyze_graph(m, probe(m, images(1)))
    assert {b.n_units for b in structure.blocks} == {8}
