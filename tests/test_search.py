"""Stage *search*: which units are kept for a FLOPs budget.

Most tests use a hand-built structure and cost model (4 layers of 8 heads and 256 neurons, plus
5% of the MACs outside every block, one MLP with a width that is not a multiple of 8), so the
budgets can be checked against exact arithmetic; one test runs the real tiny export's costs and
checks the predicted fraction against the MACs of the rewritten graph.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from optin_onnx import rewrite
from optin_onnx.analysis import Block, Structure
from optin_onnx.errors import OptinError
from optin_onnx.flops import MacModel, mac_model, total_macs
from optin_onnx.pipeline import analyze
from optin_onnx.search import search

LAYERS, HEADS, NEURONS = 4, 8, 256
LAST_WIDTH = 252  # layer 3's FFN: not a multiple of 8
HEAD_COST, NEURON_COST = 100.0, 10.0
BUDGETS = (0.9, 0.7, 0.5, 0.3)


def block(name: str, kind: str, n_units: int, layer: int) -> Block:
    return Block(name=name, kind=kind, n_units=n_units, unit_size=8 if kind == "attention" else 1,
                 sources=[], consumers=[], slices=[], shape_edits=[], nodes=[], layer=layer)


def hand_built() -> tuple[Structure, MacModel]:
    s = Structure(n_layers=LAYERS)
    unit = {}
    for layer in range(LAYERS):
        s.blocks.append(block(f"layer{layer}.attention", "attention", HEADS, layer))
        width = LAST_WIDTH if layer == LAYERS - 1 else NEURONS
        s.blocks.append(block(f"layer{layer}.mlp", "mlp", width, layer))
        unit[f"layer{layer}.attention"] = HEAD_COST
        unit[f"layer{layer}.mlp"] = NEURON_COST
    blocks = sum(unit[b.name] * b.n_units for b in s.blocks)
    base = int(round(blocks * 0.05 / 0.95))
    return s, MacModel(total=int(base + blocks), base=base, unit=unit, seq_len=128)


def random_importance(s: Structure, seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct positive scores; heads on a larger scale than single neurons, as in practice."""
    rng = np.random.default_rng(seed)
    return {b.name: rng.random(b.n_units) * (5.0 if b.kind == "attention" else 1.0) + 1e-3
            for b in s.blocks}


def achieved(s: Structure, macs: MacModel, keep) -> float:
    """The kept fraction recomputed from scratch (not via the MacModel helpers under test)."""
    kept = macs.base + sum(macs.unit[b.name] * len(keep[b.name]) for b in s.blocks)
    return kept / macs.total


def floor_fraction(s: Structure, macs: MacModel, width_multiple: int = 1) -> float:
    """Smallest model without block removal: one head per attention, one chunk per MLP."""
    floor = macs.base + sum(macs.unit[b.name] * (1 if b.kind == "attention"
                                                 else min(width_multiple, b.n_units))
                            for b in s.blocks)
    return floor / macs.total


def check_keep_sets(s: Structure, keep) -> None:
    assert set(keep) == {b.name for b in s.blocks}
    for b in s.blocks:
        units = keep[b.name]
        assert units == sorted(set(units)), f"{b.name}: keep set not sorted/unique"
        assert all(0 <= u < b.n_units for u in units)


@pytest.mark.parametrize("flops", BUDGETS)
@pytest.mark.parametrize("width_multiple", [1, 8])
def test_budget_is_met_from_below(flops, width_multiple):
    s, macs = hand_built()
    r = search(s, random_importance(s), macs, flops, width_multiple=width_multiple)
    check_keep_sets(s, r.keep)
    frac = achieved(s, macs, r.keep)
    assert r.fraction == pytest.approx(frac, rel=1e-12)
    assert frac <= flops + 1e-12
    assert frac >= flops - 0.01, f"budget {flops}: only {frac:.4f} used"
    for b in s.blocks:
        assert len(r.keep[b.name]) >= 1, f"{b.name} emptied without allow_block_removal"
        if b.kind == "mlp" and width_multiple > 1:
            width = len(r.keep[b.name])
            assert width % width_multiple == 0 or width == b.n_units, f"{b.name}: width {width}"


def test_rounded_widths_reach_the_odd_full_width():
    """Budget 1.0 keeps everything: the 252-wide FFN stays 252 (its last chunk has 4 neurons)."""
    s, macs = hand_built()
    r = search(s, random_importance(s), macs, 1.0, width_multiple=8)
    assert r.keep == {b.name: list(range(b.n_units)) for b in s.blocks}
    assert r.fraction == pytest.approx(1.0)


def test_keeps_the_most_important_units_within_each_block():
    s, macs = hand_built()
    imp = random_importance(s, seed=3)
    for flops in BUDGETS:
        for width_multiple in (1, 8):
            keep = search(s, imp, macs, flops, width_multiple=width_multiple).keep
            for b in s.blocks:
                kept = imp[b.name][keep[b.name]]
                dropped = np.delete(imp[b.name], keep[b.name])
                if kept.size and dropped.size:
                    assert kept.min() > dropped.max(), (flops, width_multiple, b.name)


def test_importance_decides_where_the_budget_goes():
    """Scores concentrated in layer 0's FFN: that block is kept whole, the dull ones are cut."""
    s, macs = hand_built()
    imp = {b.name: np.full(b.n_units, 1e-3) + np.arange(b.n_units) * 1e-6 for b in s.blocks}
    imp["layer0.mlp"] = np.ones(NEURONS)
    imp["layer2.attention"] = np.full(HEADS, 100.0)
    keep = search(s, imp, macs, 0.5).keep
    assert len(keep["layer0.mlp"]) == NEURONS
    assert len(keep["layer2.attention"]) == HEADS
    assert len(keep["layer1.mlp"]) < NEURONS // 2


def test_prune_heads_only_leaves_mlp_whole():
    s, macs = hand_built()
    r = search(s, random_importance(s), macs, 0.9, prune="heads")
    for b in s.blocks:
        if b.kind == "mlp":
            assert r.keep[b.name] == list(range(b.n_units))
        else:
            assert 1 <= len(r.keep[b.name])
    assert sum(len(r.keep[b.name]) for b in s.blocks if b.kind == "attention") < LAYERS * HEADS
    assert 0.9 - HEAD_COST / macs.total <= achieved(s, macs, r.keep) <= 0.9


def test_prune_neurons_only_leaves_attention_whole():
    s, macs = hand_built()
    r = search(s, random_importance(s), macs, 0.6, prune="neurons")
    for b in s.blocks:
        if b.kind == "attention":
            assert r.keep[b.name] == list(range(HEADS))
        else:
            assert 1 <= len(r.keep[b.name]) < b.n_units
    assert 0.6 - 0.01 <= achieved(s, macs, r.keep) <= 0.6


def test_bad_prune_mode_is_an_error():
    s, macs = hand_built()
    with pytest.raises(OptinError, match="--prune"):
        search(s, random_importance(s), macs, 0.5, prune="layers")


def test_block_removal_is_opt_in():
    s, macs = hand_built()
    imp = random_importance(s)
    tiny = (floor_fraction(s, macs) + macs.base / macs.total) / 2
    with pytest.raises(OptinError):
        search(s, imp, macs, tiny)
    r = search(s, imp, macs, tiny, allow_block_removal=True)
    check_keep_sets(s, r.keep)
    assert achieved(s, macs, r.keep) <= tiny + 1e-12
    assert any(not r.keep[b.name] for b in s.blocks), "no block was emptied"
    # The base MACs (embeddings, heads) are never removable: the smallest budget is the base.
    r = search(s, imp, macs, macs.base / macs.total, allow_block_removal=True)
    assert all(not v for v in r.keep.values())


@pytest.mark.parametrize("width_multiple", [1, 8])
def test_impossible_budget_names_the_smallest_fraction(width_multiple):
    s, macs = hand_built()
    smallest = floor_fraction(s, macs, width_multiple)
    flops = smallest * 0.9
    with pytest.raises(OptinError) as exc:
        search(s, random_importance(s), macs, flops, width_multiple=width_multiple)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "impossible" in msg
    assert f"{smallest:.3f}" in msg, msg
    assert "--allow-block-removal" in msg
    # Just above the floor is feasible and lands on it.
    r = search(s, random_importance(s), macs, smallest + 1e-6, width_multiple=width_multiple)
    assert achieved(s, macs, r.keep) == pytest.approx(smallest)


def test_impossible_even_with_block_removal():
    s, macs = hand_built()
    smallest = macs.base / macs.total
    with pytest.raises(OptinError, match=re.escape(f"{smallest:.3f}")) as exc:
        search(s, random_importance(s), macs, smallest / 2, allow_block_removal=True)
    assert "--allow-block-removal" not in str(exc.value)


@pytest.mark.parametrize("flops", [0.0, -0.1, 1.0000001, 1.5, math.nan])
def test_budget_outside_unit_interval_is_an_error(flops):
    s, macs = hand_built()
    with pytest.raises(OptinError, match=r"--flops must be in \(0, 1\]"):
        search(s, random_importance(s), macs, flops)


# -- the real tiny model ---------------------------------------------------------------------------

@pytest.mark.parametrize("flops", BUDGETS)
def test_real_tiny_model_prediction_matches_the_rewritten_graph(tiny_exports, flops):
    m, s = analyze(tiny_exports[("torchscript", "classifier", False)])
    macs = mac_model(m, s, 12)
    r = search(s, random_importance(s, seed=1), macs, flops)
    assert flops - 0.01 <= r.fraction <= flops
    for b in s.blocks:
        assert 1 <= len(r.keep[b.name]) <= b.n_units
    # The MacModel is exact: the rewritten graph has precisely the predicted MACs.
    slim = rewrite.rewrite(m, s, r.keep)
    assert total_macs(slim, 12) == pytest.approx(r.fraction * macs.total, rel=1e-9)
