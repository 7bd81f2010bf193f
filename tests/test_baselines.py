"""Baseline criteria (magnitude, random) and ``prune(method=...)`` for every criterion."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import optin_onnx
from optin_onnx.analysis.structure import Role
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.pipeline import METHODS, prune
from optin_onnx.scoring.baselines import score_magnitude, score_random
from tests.helpers import tiny_feeds

FORM = ("torchscript", "classifier", False)
ZERO_HEAD, ZERO_NEURON = 2, 5


def _zeroed(src, dst) -> None:
    """Copy the tiny model with head ZERO_HEAD of layer 0 and neuron ZERO_NEURON of layer 1
    zeroed: every parameter element that is sliced away with them set to 0."""
    model, structure = optin_onnx.analyze(src)
    nodes = nodes_by_name(model.graph)
    targets = {"layer0.attention": ZERO_HEAD, "layer1.mlp": ZERO_NEURON}
    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    for b in structure.blocks:
        if b.name not in targets:
            continue
        unit = targets[b.name]
        for s in b.slices:
            name = nodes[s.node].inputs[s.input_index].name
            t = inits[name]
            arr = numpy_helper.to_array(t).copy()
            idx = b.channels([unit]) if s.role is Role.FLAT else [unit]
            view = np.moveaxis(arr, s.axis, 0)
            view[idx] = 0.0
            t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(proto, str(dst))


@pytest.fixture(scope="module")
def zeroed(tiny_exports, tmp_path_factory):
    dst = tmp_path_factory.mktemp("zeroed") / "zeroed.onnx"
    _zeroed(tiny_exports[FORM], dst)
    return dst


def test_magnitude_is_deterministic_nonnegative_and_covers_every_unit(tiny_exports):
    model, structure = optin_onnx.analyze(tiny_exports[FORM])
    a = score_magnitude(model, structure)
    b = score_magnitude(model, structure)
    assert set(a.importance) == {blk.name for blk in structure.blocks}
    for blk in structure.blocks:
        s = a.importance[blk.name]
        assert s.shape == (blk.n_units,)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        np.testing.assert_array_equal(s, b.importance[blk.name])


def test_magnitude_is_the_norm_of_what_is_sliced_away(tiny_exports):
    """A neuron's score is || (W1[:, j], b1[j], W2[j, :]) ||^2; a head's is that of its Q, K, V
    columns and biases and its W_O rows."""
    model, structure = optin_onnx.analyze(tiny_exports[FORM])
    nodes = nodes_by_name(model.graph)
    scores = score_magnitude(model, structure).importance
    for blk in structure.blocks:
        sq = np.zeros(blk.n_units * blk.unit_size)
        for s in blk.slices:
            arr = np.moveaxis(const_array(nodes[s.node].inputs[s.input_index]).astype(np.float64),
                              s.axis, 0)
            sq += (arr.reshape(arr.shape[0], -1) ** 2).sum(axis=1)
        assert len(blk.slices) == (7 if blk.kind == "attention" else 3)  # weights+biases, out rows
        expected = sq.reshape(blk.n_units, blk.unit_size).sum(axis=1)
        np.testing.assert_allclose(scores[blk.name], expected, rtol=1e-12)


def test_zeroed_units_score_zero_and_are_pruned_first(zeroed):
    model, structure = optin_onnx.analyze(zeroed)
    imp = score_magnitude(model, structure).importance
    assert imp["layer0.attention"][ZERO_HEAD] == 0.0
    assert imp["layer1.mlp"][ZERO_NEURON] == 0.0
    assert np.argmin(imp["layer0.attention"]) == ZERO_HEAD
    assert np.argmin(imp["layer1.mlp"]) == ZERO_NEURON
    assert (np.delete(imp["layer0.attention"], ZERO_HEAD) > 0).all()
    # A cut that removes anything of a kind removes these first (the search ranks each kind globally).
    feeds = tiny_feeds(8, 16, seed=3)
    for what, block, unit in (("neurons", "layer1.mlp", ZERO_NEURON),
                              ("heads", "layer0.attention", ZERO_HEAD)):
        r = prune(zeroed, feeds, method="magnitude", prune=what, flops=0.95, latency_cases=[],
                  simplify="off")
        assert r.verification.passed
        kept = r.selection.keep[block]
        assert unit not in kept and len(kept) < len(imp[block]), (what, kept)


def test_random_is_reproducible_per_seed_and_differs_across_seeds(tiny_exports):
    _, structure = optin_onnx.analyze(tiny_exports[FORM])
    a, b, c = score_random(structure, 0), score_random(structure, 0), score_random(structure, 1)
    for blk in structure.blocks:
        assert a.importance[blk.name].shape == (blk.n_units,)
        assert ((a.importance[blk.name] >= 0) & (a.importance[blk.name] < 1)).all()
        np.testing.assert_array_equal(a.importance[blk.name], b.importance[blk.name])
    assert any(not np.array_equal(a.importance[n], c.importance[n]) for n in a.importance)


@pytest.mark.parametrize("method", METHODS)
def test_prune_end_to_end_with_every_method(tiny_exports, tmp_path, method):
    feeds = tiny_feeds(24, 16, seed=1)
    r = prune(tiny_exports[FORM], feeds, method=method, flops=0.6, samples=16, latency_cases=[],
              output=tmp_path / f"{method}.onnx")
    assert r.verification.passed
    assert r.report.flops_achieved <= 0.6 + 1e-9
    assert r.report.flops_achieved == pytest.approx(0.6, abs=0.01)
    assert (tmp_path / f"{method}.onnx").exists()
    assert set(r.scores.importance) == {b.name for b in r.structure.blocks}


def test_methods_choose_differently(tiny_exports):
    feeds = tiny_feeds(24, 16, seed=1)
    keeps = {m: prune(tiny_exports[FORM], feeds, method=m, flops=0.6, samples=16,
                      latency_cases=[], simplify="off").selection.keep
             for m in ("magnitude", "random")}
    assert keeps["magnitude"] != keeps["random"]


def test_unknown_method_is_one_line_error(tiny_exports):
    with pytest.raises(OptinError, match="--method must be one of") as e:
        prune(tiny_exports[FORM], tiny_feeds(4, 8), method="wanda")
    assert "\n" not in str(e.value)
