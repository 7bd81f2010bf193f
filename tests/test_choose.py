"""Choosing units within blocks for the refit (structured OBS): the greedy removal keeps what the
closed-form cost says it should, drops a unit the others can carry before one they cannot, gives
every block its searched count, and its choice reconstructs the consumer output better than the
scores' choice once refitted."""
from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx.analysis import analyze_graph
from optin_onnx.calibrate import make_calibration
from optin_onnx.graph import normalize
from optin_onnx.pipeline import prune
from optin_onnx.probe import probe
from optin_onnx.reconstruct.choose import choose_within, obs_keep
from tests.helpers import tiny_feeds


@pytest.fixture(scope="module")
def tiny(tiny_exports):
    return tiny_exports[("torchscript", "classifier", False)]


def _refit_error(x: np.ndarray, w: np.ndarray, rows: list[int]) -> float:
    """||X_kept W_fit - X W||^2 with W_fit the least-squares refit on the kept rows."""
    target = x @ w
    fit, *_ = np.linalg.lstsq(x[:, rows], target, rcond=None)
    return float(np.sum((x[:, rows] @ fit - target) ** 2))


def test_independent_units_keep_the_largest_output_energy():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 3.0, 0.5, 2.0, 0.1])
    q, _ = np.linalg.qr(rng.normal(size=(200, 5)))
    x = q * scale * 10  # orthogonal columns: H is diagonal
    w = rng.normal(size=(5, 4))
    energy = scale ** 2 * (w ** 2).sum(1)
    got = obs_keep(x.T @ x, w, [np.array([i]) for i in range(5)], 3, damping=1e-9)
    assert got == sorted(np.argsort(-energy)[:3].tolist())


def test_a_unit_the_others_can_carry_goes_first():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 1)) * 5, rng.normal(size=(300, 1)) * 0.5
    x = np.hstack([a, b, a + 1e-3 * rng.normal(size=(300, 1))])  # unit 2 copies unit 0
    w = np.array([[1.0], [1.0], [1.0]])
    got = obs_keep(x.T @ x, w, [np.array([i]) for i in range(3)], 2, damping=1e-9)
    # Each copy carries far more output than unit 1, but either copy can stand in for the other.
    assert 1 in got and len(got) == 2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_units_match_the_best_subset_on_a_small_problem(k):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(400, 3))
    x = np.hstack([base, base @ rng.normal(size=(3, 5)) + 0.3 * rng.normal(size=(400, 5))])
    spans = [np.arange(2 * u, 2 * u + 2) for u in range(4)]  # 4 "heads" of 2 rows
    w = rng.normal(size=(8, 3))
    got = obs_keep(x.T @ x, w, spans, k, damping=1e-9)
    assert len(got) == k

    def error(units):
        return _refit_error(x, w, [r for u in units for r in spans[u]])

    best = min(error(c) for c in itertools.combinations(range(4), k))
    # Greedy, so not always the optimum; within a small factor of it on this problem.
    assert error(got) <= 1.5 * best + 1e-9


def test_batched_scalar_removal_keeps_the_count_and_beats_the_norms():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 200))  # rank 40 of 200
    w = rng.normal(size=(200, 8))
    got = obs_keep(x.T @ x, w, [np.array([i]) for i in range(200)], 40)
    assert len(got) == 40 == len(set(got))
    by_norm = np.argsort(-(w ** 2).sum(1) * (x ** 2).sum(0))[:40].tolist()
    assert _refit_error(x, w, got) < 0.5 * _refit_error(x, w, by_norm)


def test_choose_within_keeps_counts_and_only_moves_plain_consumers(tiny):
    m = normalize(ir.load(tiny))
    s = analyze_graph(m, probe(m))
    cal = make_calibration(tiny_feeds(12, 16, seed=4), chunk_size=4)
    keep = {b.name: list(range(b.n_units // 2)) for b in s.blocks}
    got = choose_within(m, s, keep, cal)
    assert {k: len(v) for k, v in got.keep.items()} == {k: len(v) for k, v in keep.items()}
    assert set(got.changed) == {b.name for b in s.blocks}
    for b in s.blocks:
        assert all(0 <= u < b.n_units for u in got.keep[b.name])
        assert got.keep[b.name] == sorted(set(got.keep[b.name]))
    assert got.notes()[0].startswith(f"units within {len(s.blocks)} blocks chosen for the refit")


def test_prune_with_the_refit_choice_verifies_and_fits_better(tiny):
    calib = tiny_feeds(48, 16, seed=5)
    common = dict(flops=0.6, samples=32, latency_cases=(), simplify="off", neuron_group=4)
    scores = prune(tiny, calib, within="scores", **common)
    refit = prune(tiny, calib, within="refit", **common)
    assert scores.verification.passed and refit.verification.passed
    assert {k: len(v) for k, v in refit.selection.keep.items()} == \
           {k: len(v) for k, v in scores.selection.keep.items()}
    assert refit.report.flops_achieved == pytest.approx(scores.report.flops_achieved)
    assert any("chosen for the refit" in n for n in refit.report.notes)
    assert not any("chosen for the refit" in n for n in scores.report.notes)
