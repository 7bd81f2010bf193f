"""Stage *reconstruct*, refit: streamed Gram matrices equal one batch, the damped solve is the
ridge solution (and survives a singular system), the refit lowers the held-out error where pruning
hurts, the guard rejects fits that do not generalise, and slicing the refitted model stays exact."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx.analysis import analyze_graph
from optin_onnx.calibrate import make_calibration
from optin_onnx.graph import const_array, nodes_by_name, normalize
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.pipeline import prune
from optin_onnx.probe import probe
from optin_onnx.reconstruct import gram as gm
from optin_onnx.reconstruct import layerwise as rf
from optin_onnx.reconstruct import session
from optin_onnx.reconstruct.session import Window
from optin_onnx.rewrite import rewrite
from tests.helpers import run, tiny_feeds

FORMS = [("torchscript", "classifier", False), ("dynamo", "classifier", True)]


def _load(path):
    m = normalize(ir.load(path))
    return m, analyze_graph(m, probe(m))


def _tiny(tiny_exports, form):
    m, s = _load(tiny_exports[form])
    rng = np.random.default_rng(0)
    keep = {b.name: sorted(rng.choice(b.n_units, b.n_units // 2, replace=False).tolist())
            for b in s.blocks}
    return m, s, keep


def test_gram_in_chunks_equals_one_batch():
    rng = np.random.default_rng(0)
    a, t = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(50, 3))
    whole, parts = gm.Gram(6, 3), gm.Gram(6, 3)
    whole.add(a, t)
    for lo, hi in ((0, 7), (7, 30), (30, 50)):
        parts.add(a[lo:hi], t[lo:hi])
    np.testing.assert_allclose(parts.aa, whole.aa, rtol=1e-12)
    np.testing.assert_allclose(parts.at, whole.at, rtol=1e-12)
    assert parts.tt == pytest.approx(whole.tt) and parts.rows == whole.rows == 50
    w = rng.normal(size=(6, 3))
    direct = float(np.sum((a.astype(np.float64) @ w - t) ** 2))
    assert whole.error(w) == pytest.approx(direct, rel=1e-10)


def test_ridge_is_the_damped_least_squares_solution():
    rng = np.random.default_rng(1)
    a = np.hstack([rng.normal(size=(40, 5)), np.ones((40, 1))])
    t = rng.normal(size=(40, 2))
    g = gm.Gram(6, 2)
    g.add(a, t)
    w0 = rng.normal(size=(6, 2))
    # No damping: ordinary least squares.
    np.testing.assert_allclose(gm.ridge(g, w0, 0.0, free=1),
                               np.linalg.lstsq(a, t, rcond=None)[0], atol=1e-9)
    # The damped solution is the stationary point of the penalised objective (bias unpenalised).
    d = 0.3
    w = gm.ridge(g, w0, d, free=1)
    lam = d * np.mean(np.diag(g.aa)[:5])
    pen = np.diag([1.0] * 5 + [0.0])
    np.testing.assert_allclose(a.T @ (a @ w - t) + lam * pen @ (w - w0), 0, atol=1e-8)
    # Very strong damping keeps the weights and fits the bias alone.
    far = gm.ridge(g, w0, 1e12, free=1)
    np.testing.assert_allclose(far[:5], w0[:5], atol=1e-6)


def test_singular_system_falls_back_to_least_squares():
    a = np.zeros((10, 3))
    a[:, 0] = np.arange(10)  # columns 1 and 2 never fire: A^T A is singular
    g = gm.Gram(3, 1)
    g.add(a, 2 * a[:, :1])
    w = gm.ridge(g, np.zeros((3, 1)), 0.0)
    assert np.all(np.isfinite(w))
    assert w[0, 0] == pytest.approx(2.0)


@pytest.mark.parametrize("form", FORMS, ids=["torchscript", "dynamo-onnxsim"])
def test_refit_lowers_the_held_out_error_and_slicing_stays_exact(tiny_exports, form):
    m, s, keep = _tiny(tiny_exports, form)
    cal = make_calibration(tiny_feeds(32, 12, seed=1), chunk_size=8)
    held = make_calibration(tiny_feeds(32, 12, seed=2), chunk_size=8)
    got = rf.refit(m, s, keep, cal, held)
    assert got.kept and got.held_after < 0.7 * got.held_before
    fitted = [b for b in got.blocks if b.method != "none"]
    assert fitted and all(b.held_after < b.held_before for b in fitted)
    assert any("refit applied" in n for n in got.notes())
    # Only kept rows and biases change: the pruned rows of every consumer weight are as they were.
    old, new = nodes_by_name(m.graph), nodes_by_name(got.model.graph)
    for b in s.blocks:
        c = b.consumers[0]
        w_old = const_array(old[c.node].inputs[c.weight_index])
        w_new = const_array(new[c.node].inputs[c.weight_index])
        dropped = np.setdiff1d(np.arange(w_old.shape[c.weight_axis]),
                               b.channels(keep[b.name]))
        np.testing.assert_array_equal(np.take(w_new, dropped, c.weight_axis),
                                      np.take(w_old, dropped, c.weight_axis))
    # masked == sliced on the corrected model; the uncorrected masked model is another function.
    feeds = tiny_feeds(3, 9, seed=5)
    slim = rewrite(got.model, s, keep)
    want = run(masked_model(got.model, s, unit_masks(s, keep)), feeds)
    for a, b in zip(run(slim, feeds), want):
        np.testing.assert_allclose(a, b, atol=1e-5)
    before = run(masked_model(m, s, unit_masks(s, keep)), feeds)
    assert max(np.max(np.abs(a - b)) for a, b in zip(want, before)) > 1e-3


def test_the_guard_rejects_a_fit_that_does_not_generalise():
    """The scoring rows follow other weights than the held-out rows, which the current weights
    already fit: every candidate the scoring rows pull out moves away from them, so the guard
    keeps the weights. With held-out rows like the scoring rows, the ridge fit wins."""
    rng = np.random.default_rng(3)
    w0, w_other = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    x_fit, x_held = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    ones = np.ones((30, 1))
    fit, check, like = gm.Gram(5, 2), gm.Gram(5, 2), gm.Gram(5, 2)
    fit.add(np.hstack([x_fit, ones]), x_fit @ w_other + 0.5)
    check.add(np.hstack([x_held, ones]), x_held @ w0)
    assert rf.choose(fit, check, w0, 1, rf.DAMPINGS) is None
    like.add(np.hstack([x_held, ones]), x_held @ w_other + 0.5)
    method, damping, w, before, after = rf.choose(fit, like, w0, 1, rf.DAMPINGS)
    assert method == "ridge" and damping == min(rf.DAMPINGS) and after < 1e-3 * before
    # Only a shifted bias in the scoring rows: FLAP's compensation is the exact answer.
    shifted = gm.Gram(5, 2)
    shifted.add(np.hstack([x_fit, ones]), x_fit @ w0 + 0.5)
    held_shift = gm.Gram(5, 2)
    held_shift.add(np.hstack([x_held, ones]), x_held @ w0 + 0.5)
    method, _, w, _, after = rf.choose(shifted, held_shift, w0, 1, rf.DAMPINGS)
    assert method == "bias" and after == pytest.approx(0.0, abs=1e-9)


def test_a_refit_is_never_kept_where_it_raises_the_held_out_error(tiny_exports):
    """Two texts of four tokens and almost no damping: fits interpolate their few rows. Whatever
    is kept lowered its block's held-out error, and the model is kept only if its held-out
    output is closer to the dense one; otherwise it is returned unchanged."""
    m, s, keep = _tiny(tiny_exports, FORMS[0])
    cal = make_calibration(tiny_feeds(2, 4, seed=7), chunk_size=2)
    held = make_calibration(tiny_feeds(32, 12, seed=2), chunk_size=8)
    got = rf.refit(m, s, keep, cal, held, dampings=(1e-9,))
    for b in got.blocks:
        assert b.method == "none" or b.held_after < b.held_before
    if got.kept:
        assert got.held_after < got.held_before
    else:
        feeds = tiny_feeds(2, 9)
        for a, b in zip(run(m, feeds), run(got.model, feeds)):
            np.testing.assert_array_equal(a, b)


def test_blocks_that_cannot_be_refitted_say_why(tiny_exports):
    m, s, keep = _tiny(tiny_exports, FORMS[0])
    plans = {b.name: rf._plan(m, b, b.consumers[0]) for b in s.blocks}
    assert all(isinstance(p, rf._Plan) for p in plans.values())
    # Every plan targets the residual sum the block writes, and moves the block's own bias.
    for b in s.blocks:
        assert plans[b.name].point == nodes_by_name(m.graph)[b.removal.node].outputs[0].name
        assert plans[b.name].bias == b.removal.bias_uses[0]


def test_prune_with_refit_verifies_against_the_corrected_model(tiny_exports):
    feeds = tiny_feeds(48, 12, seed=3)
    form = FORMS[0]
    plain = prune(tiny_exports[form], feeds, flops=0.5, samples=24, latency_cases=[],
                  simplify="off", reconstruct="none")
    fixed = prune(tiny_exports[form], feeds, flops=0.5, samples=24, latency_cases=[],
                  simplify="off", reconstruct="refit")
    assert fixed.report.verify["passed"] and fixed.report.verify["max_abs_err"] < 1e-4
    assert any(n.startswith("refit applied") for n in fixed.report.notes)
    assert not any("refit" in n for n in plain.report.notes)
    assert fixed.selection.keep == plain.selection.keep
    assert fixed.report.fidelity["kl_to_dense"] < plain.report.fidelity["kl_to_dense"]


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_cnn_readers_are_refitted_and_slicing_stays_exact(tmp_path, kind):
    """Every reader of a channel group is refitted in graph order: 3x3 convs through their im2col
    patches, 1x1 convs, readers after a channel Concat (their rows only) and the classifier after
    Flatten. Pruning half the channels at random hurts these nets badly; the refit recovers most
    of it on held-out images, and slicing the refitted model is still exact."""
    from models.cnn import export_tiny_cnn
    from tests.test_cnn import images, random_keep

    m, s = _load(export_tiny_cnn(tmp_path / f"{kind}.onnx", kind, "torchscript", keep_bn=False))
    keep = random_keep(s, 5)
    cal = make_calibration({"input": images(16, seed=4)}, chunk_size=4)
    held = make_calibration({"input": images(16, seed=5)}, chunk_size=4)
    got = rf.refit(m, s, keep, cal, held)
    assert got.kept and got.held_after < 0.05 * got.held_before
    assert sum(b.method != "none" for b in got.blocks) >= len(s.blocks) - 1
    x = {"input": images(2, seed=9)}
    want = run(masked_model(got.model, s, unit_masks(s, keep)), x)[0]
    np.testing.assert_allclose(run(rewrite(got.model, s, keep), x)[0], want, atol=1e-5)


def test_im2col_patches_reproduce_the_conv():
    w = Window((3, 3), (2, 1), (1, 0, 1, 2), (1, 2))
    rng = np.random.default_rng(0)
    x, k = rng.normal(size=(2, 3, 9, 8)), rng.normal(size=(4, 3, 3, 3))
    import onnx
    from onnx import helper

    node = helper.make_node("Conv", ["x", "k"], ["y"], kernel_shape=[3, 3], strides=[2, 1],
                            pads=[1, 0, 1, 2], dilations=[1, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [onnx.numpy_helper.from_array(k.astype(np.float32), "k")])
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
            {"x": x.astype(np.float32)})[0]
    rows = w.patches(x) @ k.reshape(4, -1).T
    np.testing.assert_allclose(rows, np.moveaxis(y, 1, -1).reshape(-1, 4), atol=1e-4)


def test_the_walk_gives_what_whole_model_runs_give(tiny_exports):
    """Walked segment by segment, teacher and student see at every position exactly the values
    a whole-model run with their feeds computes; a walk cannot go back."""
    from optin_onnx import runtime

    m, s, keep = _tiny(tiny_exports, FORMS[0])
    cal = make_calibration(tiny_feeds(10, 12, seed=1), chunk_size=4)
    held = make_calibration(tiny_feeds(6, 12, seed=2), chunk_size=4)
    masks = unit_masks(s, keep)
    consumers = [b.consumers[0] for b in s.blocks]
    sess = session.Session(m, s, masks, consumers, [], None)
    walk = sess.start(cal, held)
    nodes = list(sess.proto.graph.node)
    names = [n.output[0] for n in nodes]
    stops = sorted(sess.position[c.node] for c in consumers) + [len(nodes)]
    for position in stops:
        walk.goto(position)
        later = names[position:position + 5] + [sess.proto.graph.output[0].name]
        for walker in ("teacher", "student"):
            for data in (cal, held):
                for chunk, got in zip(data.chunks, walk.values(walker, data, later)):
                    want = runtime.run_all_values(sess.proto, {**chunk.feeds,
                                                               **sess.feeds[walker]}, later)
                    for name in later:
                        np.testing.assert_allclose(got[name], want[name], rtol=1e-5,
                                                   atol=1e-5)
    with pytest.raises(ValueError, match="cannot|not before"):
        walk.goto(stops[0])


@pytest.mark.parametrize("flags, wanted", [([], "refit"), (["--reconstruct"], "refit"),
                                           (["--reconstruct", "scales"], "scales"),
                                           (["--reconstruct", "none"], "none"),
                                           (["--no-reconstruct"], "none")])
def test_cli_reconstruct_flags(flags, wanted):
    from optin_onnx import cli

    args = cli._parser().parse_args(["prune", "in.onnx", "out.onnx", "--calib", "c.npz", *flags])
    assert args.reconstruct == wanted


def test_refit_results_are_pinned(tiny_exports, tmp_path):
    """The refit's choices, held-out errors and corrected outputs as the first implementation
    (a session per fit, Cholesky solves) gave them, so that making it cheaper (one shared
    session with weights as inputs, LU solves) cannot silently change what it computes."""
    from models.cnn import export_tiny_cnn
    from tests.test_cnn import images, random_keep

    m, s, keep = _tiny(tiny_exports, FORMS[0])
    got = rf.refit(m, s, keep, make_calibration(tiny_feeds(32, 12, seed=1), chunk_size=8),
                   make_calibration(tiny_feeds(32, 12, seed=2), chunk_size=8))
    assert [(b.block, b.method, b.damping) for b in got.blocks] == [
        ("layer0.attention", "ridge", 1.0), ("layer0.mlp", "ridge", 0.1),
        ("layer1.attention", "ridge", 0.1), ("layer1.mlp", "ridge", 0.1)]
    assert (got.held_before, got.held_after) == pytest.approx((0.157793491, 0.0463606649),
                                                              rel=1e-5)
    out = run(got.model, tiny_feeds(3, 9, seed=5))[0]
    assert (out.sum(), np.abs(out).sum()) == pytest.approx((4.8111897, 5.6064844), rel=1e-5)

    m, s = _load(export_tiny_cnn(tmp_path / "resnet.onnx", "resnet", "torchscript",
                                 keep_bn=False))
    got = rf.refit(m, s, random_keep(s, 5),
                   make_calibration({"input": images(16, seed=4)}, chunk_size=4),
                   make_calibration({"input": images(16, seed=5)}, chunk_size=4))
    assert [(b.method, b.damping) for b in got.blocks] == [("ridge", 0.001)] * 9
    assert (got.held_before, got.held_after) == pytest.approx((0.51184804, 0.00073544965),
                                                              rel=1e-5)
    out = run(got.model, {"input": images(2, seed=9)})[0]
    assert (out.sum(), np.abs(out).sum()) == pytest.approx((-0.828969, 5.504008), rel=1e-5)
