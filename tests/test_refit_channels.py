"""Stage *reconstruct*, the refit's per-channel fits (:mod:`optin_onnx.reconstruct.channelwise`):
the per-channel Gram matrices and solves are exact, the moment match restores a channel's mean
and variance, the guard keeps a channel's parameters where no candidate generalises, and on a
net with a depthwise conv downstream of a pruned group the depthwise refit lowers the error at
that conv, checked against onnxruntime, while slicing the corrected model stays exact."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from optin_onnx import runtime
from optin_onnx.calibrate import make_calibration
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.reconstruct import channelwise as cw
from optin_onnx.reconstruct import layerwise as rf
from optin_onnx.rewrite import rewrite
from tests.helpers import run
from tests.test_refit import _load


def _gram(a: np.ndarray, t: np.ndarray) -> cw.ChannelGram:
    g = cw.ChannelGram(a.shape[0], a.shape[1])
    g.add(a, t)
    return g


def test_channel_gram_and_ridge_are_exact_per_channel():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=(3, 4, 60)), np.ones((3, 1, 60))], 1)
    t = rng.normal(size=(3, 60))
    g = _gram(a, t)
    w = rng.normal(size=(3, 5))
    direct = [np.sum((a[c].T @ w[c] - t[c]) ** 2) for c in range(3)]
    np.testing.assert_allclose(g.error(w), direct, rtol=1e-10)
    # No damping: each channel's ordinary least squares.
    got = cw.ridge_channels(g, w, 0.0)
    for c in range(3):
        np.testing.assert_allclose(got[c], np.linalg.lstsq(a[c].T, t[c], rcond=None)[0],
                                   atol=1e-9)


def test_moments_give_each_channel_the_targets_mean_and_variance():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(4, 200))
    t = 2.5 * y + rng.normal(size=(4, 200)) + np.arange(4)[:, None]
    g = _gram(np.stack([y, np.ones_like(y)], 1), t)
    a, d = cw.moments(g, np.tile([1.0, 0.0], (4, 1))).T
    fixed = a[:, None] * y + d[:, None]
    np.testing.assert_allclose(fixed.mean(1), t.mean(1), atol=1e-9)
    np.testing.assert_allclose(fixed.var(1), t.var(1), rtol=1e-9)


def test_the_guard_keeps_a_channel_whose_fits_do_not_generalise():
    """Channel 0's scoring rows follow another map than its held-out rows, which its current
    parameters already fit: every candidate moves away from them, so channel 0 keeps w0.
    Channel 1 is shifted and scaled the same way in both: it takes a fit."""
    rng = np.random.default_rng(2)
    y_fit, y_held = rng.normal(size=(2, 80)), rng.normal(size=(2, 80))
    basis = lambda y: np.stack([y, np.ones_like(y)], 1)  # noqa: E731
    t_fit = np.stack([-3.0 * y_fit[0] + 1.0, 2.0 * y_fit[1] + 0.5])
    t_held = np.stack([y_held[0], 2.0 * y_held[1] + 0.5])
    w0 = np.tile([1.0, 0.0], (2, 1))
    got = cw.choose_channels(_gram(basis(y_fit), t_fit), _gram(basis(y_held), t_held), w0,
                             rf.DAMPINGS)
    assert got.method[0] == "" and np.array_equal(got.w[0], w0[0])
    assert got.method[1] and got.w[1] == pytest.approx([2.0, 0.5], abs=1e-2)
    assert got.after < got.before


def _net(path, group: int = 6) -> str:
    """A 1x1 conv widening 3 -> 8 channels (the pruned group: its reader is the 1x1 conv after
    the ReLU), then a ReLU, a 1x1 conv 8 -> 6, a ReLU, a 3x3 conv of ``group`` groups with a bias
    (padding 1, stride 2), a ReLU and a 1x1 conv to 4 outputs. With ``group`` 6 the 3x3 conv is
    depthwise and reads no pruned group, but pruning the first group changes its input. With
    ``group`` 2 the analysis declines the 6-channel group (a grouped conv mixes channels within
    groups), so neither the grouped conv nor the last 1x1 conv is any group's reader: they get
    the per-channel affine correction."""
    rng = np.random.default_rng(3)

    def const(name, *shape, scale=0.5):
        return onnx.numpy_helper.from_array((scale * rng.normal(size=shape)).astype(np.float32),
                                            name)

    inits = [const("w1", 8, 3, 1, 1), const("b1", 8), const("w2", 6, 8, 1, 1), const("b2", 6),
             const("wd", 6, 6 // group, 3, 3), const("bd", 6), const("w3", 4, 6, 1, 1),
             const("b3", 4)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="reduce"),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
             helper.make_node("Conv", ["r2", "wd", "bd"], ["cd"], name="spatial", group=group,
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["cd"], ["rd"], name="rd"),
             helper.make_node("Conv", ["rd", "w3", "b3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info(
        "x", 1, ["n", 3, 12, 12])], [helper.make_tensor_value_info("y", 1, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _value(model, name: str, feeds) -> np.ndarray:
    """Value ``name`` of ``model`` on ``feeds``, computed by onnxruntime."""
    return runtime.session(ir.to_proto(model), outputs=[name]).run([name], feeds)[0].astype(
        np.float64)


def _x(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 3, 12, 12)).astype(np.float32)}


def test_a_depthwise_conv_downstream_of_a_pruned_group_is_refitted(tmp_path):
    m, s = _load(_net(str(tmp_path / "dw.onnx")))
    group = next(b for b in s.blocks if b.n_units == 8)
    keep = {b.name: list(range(b.n_units)) for b in s.blocks}
    keep[group.name] = [0, 2, 5]
    cal, held = (make_calibration(_x(24, 4), chunk_size=8),
                 make_calibration(_x(24, 5), chunk_size=8))
    plain = rf.refit(m, s, keep, cal, held, per_channel=False)
    fitted = rf.refit(m, s, keep, cal, held)
    entry = next(b for b in fitted.blocks if b.block == "spatial")
    assert entry.method.startswith("depthwise") and entry.held_after < entry.held_before
    assert not any(b.block == "spatial" for b in plain.blocks)
    # Only the depthwise conv's weight and bias differ between the two refits.
    old, new = nodes_by_name(plain.model.graph), nodes_by_name(fitted.model.graph)
    assert not np.array_equal(const_array(old["spatial"].inputs[1]),
                              const_array(new["spatial"].inputs[1]))
    for name in ("expand", "reduce"):
        np.testing.assert_array_equal(const_array(old[name].inputs[1]),
                                      const_array(new[name].inputs[1]))
    # Checked by onnxruntime on fresh inputs: the depthwise output is closer to the dense one.
    feeds = _x(16, 9)
    masks = unit_masks(s, keep)
    dense = _value(m, "cd", feeds)
    before = np.sum((_value(masked_model(plain.model, s, masks), "cd", feeds) - dense) ** 2)
    after = np.sum((_value(masked_model(fitted.model, s, masks), "cd", feeds) - dense) ** 2)
    assert after < 0.9 * before
    # masked == sliced on the corrected model.
    want = run(masked_model(fitted.model, s, unit_masks(s, keep)), feeds)[0]
    np.testing.assert_allclose(run(rewrite(fitted.model, s, keep), feeds)[0], want, atol=1e-5)


def test_convs_no_group_reads_get_the_affine_correction(tmp_path):
    """The grouped conv and the last 1x1 conv read no prunable group: each output channel is
    rescaled and shifted toward the dense model's, which lowers the model output's error on fresh
    inputs (onnxruntime), and the sliced model still equals the masked corrected one."""
    m, s = _load(_net(str(tmp_path / "g2.onnx"), group=2))
    assert [b.n_units for b in s.blocks] == [8]
    keep = {s.blocks[0].name: [0, 2, 5]}
    cal, held = (make_calibration(_x(24, 4), chunk_size=8),
                 make_calibration(_x(24, 5), chunk_size=8))
    plain = rf.refit(m, s, keep, cal, held, per_channel=False)
    fitted = rf.refit(m, s, keep, cal, held)
    methods = {b.block: b.method for b in fitted.blocks}
    assert methods["spatial"].startswith("affine") and methods["head"].startswith("affine")
    assert fitted.kept and fitted.held_after < plain.held_after
    feeds = _x(32, 9)
    masks = unit_masks(s, keep)
    dense = _value(m, "y", feeds)
    before = np.sum((_value(masked_model(plain.model, s, masks), "y", feeds) - dense) ** 2)
    after = np.sum((_value(masked_model(fitted.model, s, masks), "y", feeds) - dense) ** 2)
    assert after < before
    want = run(masked_model(fitted.model, s, masks), feeds)[0]
    np.testing.assert_allclose(run(rewrite(fitted.model, s, keep), feeds)[0], want, atol=1e-5)


def _weights(model) -> dict[str, np.ndarray]:
    return {f"{n.name}:{i}": const_array(n.inputs[i]) for n in model.graph if n.op_type == "Conv"
            for i in (1, 2)}


@pytest.mark.parametrize("group", [6, 2])
def test_the_per_channel_fits_are_pinned(tmp_path, group):
    """The per-channel fits' choices, held-out errors and fitted weights as the first
    implementation (a sample at a time, the dense model run again for every fit) gave them, so
    that building a chunk's rows at once and the teacher's windows cannot change them."""
    m, s = _load(_net(str(tmp_path / "n.onnx"), group=group))
    keep = {b.name: list(range(b.n_units)) for b in s.blocks}
    keep[next(b for b in s.blocks if b.n_units == 8).name] = [0, 2, 5]
    got = rf.refit(m, s, keep, make_calibration(_x(24, 4), chunk_size=8),
                   make_calibration(_x(24, 5), chunk_size=8))
    pinned = {6: ([("spatial", "depthwise (5 of 6 channels: ridge 1 3, ridge 0.001 1, ridge 0.1 1)",
                    876.151413926, 788.62837763)], (0.17418472024144696, 0.04129596182641865),
                  {"spatial": (0.6060552317649126, 0.6067419201135635)}),
              2: ([("spatial", "affine (5 of 6 channels: ridge 0.01 1, ridge 0.001 2, ridge 0.1 1, "
                    "ridge 1 1)", 2524.15460314, 2406.298726943),
                   ("head", "affine (3 of 4 channels: ridge 1 2, ridge 0.1 1)", 709.225129506,
                    687.870726955)], (0.5821257598032252, 0.12709116683537974),
                  {"spatial": (2.275856767897494, 1.148743785917759),
                   "head": (5.049312110990286, 0.7626936044543982)})}[group]
    entries = {b.block: b for b in got.blocks}
    for name, method, before, after in pinned[0]:
        assert entries[name].method == method
        assert (entries[name].held_before, entries[name].held_after) == pytest.approx(
            (before, after), rel=1e-7)
    assert (got.held_before, got.held_after) == pytest.approx(pinned[1], rel=1e-7)
    nodes = nodes_by_name(got.model.graph)
    for name, sums in pinned[2].items():
        assert tuple(float(const_array(nodes[name].inputs[i]).astype(np.float64).sum())
                     for i in (1, 2)) == pytest.approx(sums, rel=1e-6)


def test_the_refit_runs_each_node_about_once_per_walker(tmp_path, monkeypatch):
    """The refit's walk runs each node at most once per walker and chunk to move forward, plus
    the short stretches from a fitted node to its point (peeks): not a whole-model pass per
    fit, which is what a whole-model session costs (onnxruntime runs every node whatever is
    fetched)."""
    from optin_onnx.reconstruct import walk as wk

    m, s = _load(_net(str(tmp_path / "n.onnx")))
    keep = {b.name: list(range(b.n_units)) for b in s.blocks}
    keep[next(b for b in s.blocks if b.n_units == 8).name] = [0, 2, 5]
    ran = {"all": 0, "goto": 0}
    run, goto = wk.Walk._run, wk.Walk.goto

    def counted_run(self, stop, outputs, live, feeds):
        ran["all"] += stop - self.position
        return run(self, stop, outputs, live, feeds)

    def counted_goto(self, position):
        ran["goto"] += (position - self.position) * sum(len(c) for _, c in self.state.values())
        return goto(self, position)

    monkeypatch.setattr(wk.Walk, "_run", counted_run)
    monkeypatch.setattr(wk.Walk, "goto", counted_goto)
    cal, held = make_calibration(_x(24, 4), chunk_size=8), make_calibration(_x(24, 5), chunk_size=8)
    got = rf.refit(m, s, keep, cal, held)
    fits = sum(b.method != "none" for b in got.blocks)
    assert fits >= 2
    n_nodes = len(masked_model(m, s).graph)
    chunks = 2 * (3 + 3) + 3  # teacher and student on both sets, the uncorrected student held out
    assert ran["goto"] <= n_nodes * chunks
    peeks = ran["all"] - ran["goto"]
    # a whole-model pass per fit for teacher and student on both sets would be this much
    assert 0 < peeks < fits * n_nodes * 4 * 3 / 2