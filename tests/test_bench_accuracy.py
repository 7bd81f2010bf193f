"""The text benchmark (tools/bench_accuracy.py and its engine, tools/bench/): the embedding
metric, the validation split and row names."""
from __future__ import annotations

import numpy as np
import pytest

import tools.bench_accuracy as ba
from tools.bench.metrics import neighbour_overlap
from tools.bench.targets import validation_split


def test_neighbour_overlap_is_one_for_the_same_geometry_and_counts_swapped_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    assert neighbour_overlap(x, x, k=5) == 1.0
    # Scaling rows changes no cosine, so no neighbour.
    assert neighbour_overlap(x, x * rng.uniform(0.5, 2.0, (30, 1)), k=5) == 1.0
    # Four points on a circle, k=1: dense neighbours 0<->1 and 2<->3; in 'pruned' point 1 moves
    # next to 2, so 1's neighbour changes and so does 2's (now 1): 2 of 4 lists change.
    ang = np.array([0.0, 0.1, 2.0, 2.1])
    dense = np.stack([np.cos(ang), np.sin(ang)], 1)
    moved = dense.copy()
    moved[1] = [np.cos(1.95), np.sin(1.95)]
    assert neighbour_overlap(dense, moved, k=1) == pytest.approx(0.5)


def test_neighbour_overlap_rejects_bad_shapes():
    with pytest.raises(ValueError):
        neighbour_overlap(np.zeros((5, 3)), np.zeros((5, 4)), k=2)
    with pytest.raises(ValueError):
        neighbour_overlap(np.zeros((5, 3)), np.zeros((5, 3)), k=5)


def test_validation_split_is_seeded_sized_and_skips_the_calibration_prefix():
    texts = [f"t{i}" for i in range(500)]
    labels = np.arange(500)
    a_texts, a_labels = validation_split((texts, labels), n=100, skip=256, seed=1)
    b_texts, _ = validation_split((texts, labels), n=100, skip=256, seed=1)
    assert a_texts == b_texts and len(set(a_texts)) == 100
    assert a_labels.min() >= 256 and [f"t{i}" for i in a_labels] == a_texts
    assert validation_split((texts, labels), n=100, skip=256, seed=2)[0] != a_texts
    with pytest.raises(ValueError):
        validation_split((texts, labels), n=300, skip=256)


def test_row_names_say_what_differs_from_the_defaults():
    assert ba.row_name("optin", 32, 8, 1.0) == "optin"
    assert ba.row_name("optin", 128, 8, 0.1) == "optin (cal 128, lam 0.1)"
    assert ba.row_name("optin+ls", 32, 1, 1.0) == "optin+ls (ng 1)"
    assert ba.row_name("magnitude", 128, 1, 10.0) == "magnitude"  # uses no calibration
    assert ba.row_name("onnxsim-wanda", 64, 8, 1.0) == "onnxsim-wanda (cal 64)"
    assert ba.row_name("optin", 64, 8, 10.0, 0.1) == \
        "optin (cal 64, lam 10, rounds of 0.1, teacher current)"
    assert ba.row_name("local", 32, 8, 1.0, 0.1, "dense") == "local (rounds of 0.1, teacher dense)"
    assert ba.row_name("magnitude", 32, 8, 1.0, 0.1) == "magnitude"
