"""Pruning in rounds (optin_onnx.iterate): scoring on top of an earlier selection is exact (fast ==
naive), dropped units stay dropped, each round re-scores, and prune(steps=N) ends verified."""
from __future__ import annotations

import numpy as np
import pytest

from optin_onnx.calibrate import make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.flops import mac_model
from optin_onnx.iterate import at_levels, budgets, chain, rounds
from optin_onnx.pipeline import PruneOptions, analyze, prune
from optin_onnx.scoring.trajectory import ScoreConfig, score_fast, score_naive
from optin_onnx.search import search
from tests.helpers import tiny_feeds

FORM = ("dynamo", "classifier", True)
CFG = dict(tokens=40, candidates_per_run=3)


@pytest.fixture(scope="module")
def setup(tiny_exports):
    m, s = analyze(tiny_exports[FORM])
    cal = make_calibration(tiny_feeds(6, 12, seed=1), chunk_size=4)
    return m, s, cal


def half_keep(structure) -> dict[str, list[int]]:
    """Every block keeps its odd units (so each layer loses heads and neurons)."""
    return {b.name: list(range(1, b.n_units, 2)) for b in structure.blocks}


@pytest.mark.parametrize("group,teacher", [(1, "dense"), (4, "dense"), (4, "current")])
def test_scores_on_a_base_selection_fast_equals_naive(setup, group, teacher):
    m, s, cal = setup
    cfg = ScoreConfig(**CFG, neuron_group=group, teacher=teacher)
    base = half_keep(s)
    fast = score_fast(m, s, cal, cfg, base=base)
    naive = score_naive(m, s, cal, cfg, base=base)
    for b in s.blocks:
        dropped = [u for u in range(b.n_units) if u not in base[b.name]]
        for term in ("md", "kd", "importance"):
            f, n = getattr(fast, term)[b.name], getattr(naive, term)[b.name]
            assert np.all(np.isnan(f[dropped])) and np.all(np.isnan(n[dropped])), \
                f"dropped units of {b.name} are no candidates"
            alive = base[b.name]
            assert np.all(np.isfinite(f[alive]))
            scale = np.abs(n[alive]).max()
            assert scale > 0
            assert np.abs(f[alive] - n[alive]).max() <= 1e-5 * scale, (term, b.name)
            if teacher == "current":  # distances from the model scored: never negative
                assert np.all(f[alive] >= 0), (term, b.name)


def test_a_full_base_scores_like_one_shot(setup):
    """With nothing dropped yet the base loss is exactly zero: the scores are the paper's."""
    m, s, cal = setup
    cfg = ScoreConfig(**CFG)
    one_shot = score_fast(m, s, cal, cfg)
    full = score_fast(m, s, cal, cfg, base={b.name: list(range(b.n_units)) for b in s.blocks})
    for b in s.blocks:
        np.testing.assert_allclose(full.md[b.name], one_shot.md[b.name], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(full.kd[b.name], one_shot.kd[b.name], rtol=1e-5, atol=1e-9)


def test_base_scores_are_what_a_unit_adds_to_the_selection(setup):
    """Teacher dense: the masked units change what the rest is worth, so scores on a base differ
    from one-shot's.
    (A score on a base is the loss a unit adds to the base's own loss, so on this random tiny
    model with half of every layer gone it is often negative: the naive test checks the value.)"""
    m, s, cal = setup
    cfg = ScoreConfig(**CFG, teacher="dense")
    base = half_keep(s)
    on_base = score_fast(m, s, cal, cfg, base=base)
    one_shot = score_fast(m, s, cal, cfg)
    b = s.blocks[1]  # layer0.mlp
    alive = base[b.name]
    assert not np.allclose(on_base.md[b.name][alive], one_shot.md[b.name][alive], rtol=0.05)


def test_budgets_fall_linearly_to_the_target():
    np.testing.assert_allclose(budgets(0.6, 4), [0.9, 0.8, 0.7, 0.6])
    assert budgets(0.5, 1) == [0.5]
    with pytest.raises(OptinError, match="--rounds must be at least 1"):
        budgets(0.6, 0)


def test_rounds_keep_dropped_units_dropped_and_rescore(setup):
    m, s, cal = setup
    macs = mac_model(m, s, 12)
    cfg = ScoreConfig(**CFG)
    bases = []

    def score(base):
        bases.append(base)
        return score_fast(m, s, cal, cfg, base=base)

    def select(importance, flops, alive):
        return search(s, importance, macs, flops, alive=alive)

    out = list(rounds(score, select, budgets(0.5, 3)))
    assert [r.flops for r in out] == pytest.approx([5 / 6, 2 / 3, 0.5])
    assert bases[0] is None and bases[1] == out[0].selection.keep
    for before, after in zip(out, out[1:]):
        assert after.selection.fraction <= after.flops + 1e-9
        for b in s.blocks:
            assert set(after.selection.keep[b.name]) <= set(before.selection.keep[b.name])
    # The second round's scores are new measurements, not the first round's restricted.
    name = s.blocks[1].name
    alive = out[0].selection.keep[name]
    assert not np.allclose(out[1].scores.md[name][alive], out[0].scores.md[name][alive])
    with pytest.raises(OptinError, match="must decrease"):
        next(rounds(score, select, [0.6, 0.8]))


def test_search_keeps_only_alive_units(setup):
    m, s, _ = setup
    macs = mac_model(m, s, 12)
    rng = np.random.default_rng(0)
    importance = {b.name: rng.random(b.n_units) for b in s.blocks}
    alive = half_keep(s)
    sel = search(s, importance, macs, 0.4, alive=alive)
    for b in s.blocks:
        assert sel.keep[b.name] and set(sel.keep[b.name]) <= set(alive[b.name])
    assert sel.fraction <= 0.4 + 1e-9


def test_prune_in_rounds_is_verified_and_noted(tiny_exports):
    feeds = tiny_feeds(24, 16, seed=5)
    result = prune(tiny_exports[FORM], feeds, PruneOptions(flops=0.6, steps=2, samples=16,
                                                           latency_cases=[]))
    assert result.verification.passed
    assert result.report.flops_achieved <= 0.6 + 1e-6
    assert any("2 rounds of scoring and search, at 0.8, 0.6" in n for n in result.report.notes)
    with pytest.raises(OptinError, match="use --rounds 1"):
        prune(tiny_exports[FORM], feeds, PruneOptions(flops=0.6, steps=2, method="magnitude",
                                                      latency_cases=[]))


def test_one_chain_of_rounds_serves_every_level(setup):
    """Each level's prefix of the chain is the schedule prune(steps=...) would run for it, and
    at_levels picks each level's selection off that one chain."""
    levels = [0.9, 0.8, 0.7, 0.6, 0.5]
    got = chain(levels, 0.1)
    np.testing.assert_allclose(got, levels)
    for level in levels:
        steps = round((1 - level) / 0.1)
        np.testing.assert_allclose(got[:steps], budgets(level, steps))
    np.testing.assert_allclose(chain([0.6], 0.1), [0.9, 0.8, 0.7, 0.6])
    with pytest.raises(OptinError, match="whole number of steps"):
        chain([0.65], 0.1)
    m, s, cal = setup
    macs = mac_model(m, s, 12)
    calls = []

    def score(base):
        calls.append(base)
        return score_fast(m, s, cal, ScoreConfig(**CFG), base=base)

    picked = at_levels(score, lambda imp, f, alive: search(s, imp, macs, f, alive=alive),
                       [0.6, 0.8], 0.2)
    assert sorted(picked) == [0.6, 0.8] and len(calls) == 2
    assert picked[0.6].fraction <= 0.6 + 1e-9
    assert set(picked[0.6].keep[s.blocks[0].name]) <= set(picked[0.8].keep[s.blocks[0].name])
