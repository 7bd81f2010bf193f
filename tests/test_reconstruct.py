"""Stage *reconstruct*, scales: the least-squares problem is formed exactly, a fit never worsens
the loss it fits, the guard falls back to the unscaled weights, and the result stays a plain,
verified graph. The refit has its own file (tests/test_refit.py)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx.reconstruct import scales as rc
from optin_onnx.analysis import Role, analyze_graph
from optin_onnx.calibrate import capture, make_calibration
from optin_onnx.graph import const_array, nodes_by_name, normalize
from optin_onnx.instrument import masked_model
from optin_onnx.pipeline import prune
from optin_onnx.probe import probe
from tests.helpers import run, tiny_feeds

FORM = ("torchscript", "classifier", False)


@pytest.fixture(scope="module")
def tiny(tiny_exports):
    m = normalize(ir.load(tiny_exports[FORM]))
    s = analyze_graph(m, probe(m))
    rng = np.random.default_rng(0)
    keep = {b.name: sorted(rng.choice(b.n_units, b.n_units // 2, replace=False).tolist())
            for b in s.blocks}
    return m, s, keep, make_calibration(tiny_feeds(16, 12, seed=1), chunk_size=8)


def _direct_loss(x, w, y, units, size, scales):
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    pred = sum(s * (x[:, u * size:(u + 1) * size] @ w[u * size:(u + 1) * size].astype(np.float64))
               for s, u in zip(scales, units))
    return float(np.sum((pred - y.reshape(-1, y.shape[-1])) ** 2))


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_normal_equations_give_the_direct_loss(tiny, kind):
    m, s, keep, cal = tiny
    b = next(x for x in s.blocks if x.kind == kind)
    c = b.consumers[0]
    node = nodes_by_name(m.graph)[c.node]
    x_name, y_name = node.inputs[c.data_index].name, node.outputs[0].name
    vals = capture(ir.to_proto(m), cal, [x_name, y_name])[0]
    w = const_array(node.inputs[c.weight_index])
    units = keep[b.name]
    g, bv, yy = rc._normal_equations(b, vals[x_name], w, vals[y_name], units, c.role)
    size = b.unit_size if c.role is Role.FLAT else 1
    for scales in (np.ones(len(units)), np.random.default_rng(2).normal(1, 0.3, len(units))):
        direct = _direct_loss(vals[x_name], w, vals[y_name], units, size, scales)
        assert rc._loss(g, bv, yy, scales) == pytest.approx(direct, rel=1e-6)


def test_each_fit_lowers_the_loss_it_fits(tiny):
    m, s, keep, cal = tiny
    result = rc.reconstruct(m, s, keep, cal)
    assert [c.block for c in result.corrections] == [b.name for b in s.blocks]
    assert any(c.applied for c in result.corrections)
    for c in result.corrections:
        if c.applied:
            assert c.loss_after < c.loss_before
    # Measured independently on the first block (its inputs do not depend on earlier fits):
    b = s.blocks[0]
    c = b.consumers[0]
    masks = {x.name: np.isin(np.arange(x.n_units), keep[x.name]).astype(np.float32)
             for x in s.blocks}
    student = ir.to_proto(masked_model(m, s, masks))
    x_name = next(n for n in student.graph.node if n.name == c.node).input[c.data_index]
    y_name = nodes_by_name(m.graph)[c.node].outputs[0].name
    x = capture(student, cal, [x_name])[0][x_name]
    y = capture(ir.to_proto(m), cal, [y_name])[0][y_name]
    w_old = const_array(nodes_by_name(m.graph)[c.node].inputs[c.weight_index])
    w_new = const_array(nodes_by_name(result.model.graph)[c.node].inputs[c.weight_index])
    all_units = list(range(b.n_units))
    size = b.unit_size
    ones = np.isin(all_units, keep[b.name]).astype(float)
    assert _direct_loss(x, w_new, y, all_units, size, ones) < \
        _direct_loss(x, w_old, y, all_units, size, ones)


def test_guard_keeps_the_weights_when_a_scale_is_out_of_range(tiny, monkeypatch):
    m, s, keep, cal = tiny
    monkeypatch.setattr(rc, "MAX_SCALE", 0.5)
    result = rc.reconstruct(m, s, keep, cal)
    assert result.corrections and not any(c.applied for c in result.corrections)
    assert all("scale" in c.reason for c in result.corrections)
    feeds = tiny_feeds(2, 9)
    for a, b in zip(run(m, feeds), run(result.model, feeds)):
        np.testing.assert_array_equal(a, b)


def test_prune_with_reconstruct_is_verified_and_plain(tiny_exports, tmp_path):
    feeds = tiny_feeds(40, 12, seed=3)
    plain = prune(tiny_exports[FORM], feeds, flops=0.5, samples=24, latency_cases=[], simplify="off",
                  reconstruct="none")
    fixed = prune(tiny_exports[FORM], feeds, flops=0.5, samples=24, latency_cases=[], simplify="off",
                  reconstruct="scales")
    assert fixed.report.verify["passed"]
    assert any(n.startswith("least-squares scales applied") for n in fixed.report.notes)
    assert sorted(n.op_type for n in fixed.model.graph.node) == \
        sorted(n.op_type for n in plain.model.graph.node)
    # Same mask, corrected weights: the held-out outputs move towards the dense model here.
    assert fixed.report.fidelity["kl_to_dense"] < plain.report.fidelity["kl_to_dense"]
