"""tools/bench_accuracy.py: the metrics, the validation split, row names and the results table."""
from __future__ import annotations

import numpy as np
import pytest

ba = pytest.importorskip("tools.bench_accuracy")


def test_neighbour_overlap_is_one_for_the_same_geometry_and_counts_swapped_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    assert ba.neighbour_overlap(x, x, k=5) == 1.0
    # Scaling rows changes no cosine, so no neighbour.
    assert ba.neighbour_overlap(x, x * rng.uniform(0.5, 2.0, (30, 1)), k=5) == 1.0
    # Four points on a circle, k=1: dense neighbours 0<->1 and 2<->3; in 'pruned' point 1 moves
    # next to 2, so 1's neighbour changes and so does 2's (now 1): 2 of 4 lists change.
    ang = np.array([0.0, 0.1, 2.0, 2.1])
    dense = np.stack([np.cos(ang), np.sin(ang)], 1)
    moved = dense.copy()
    moved[1] = [np.cos(1.95), np.sin(1.95)]
    assert ba.neighbour_overlap(dense, moved, k=1) == pytest.approx(0.5)


def test_neighbour_overlap_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ba.neighbour_overlap(np.zeros((5, 3)), np.zeros((5, 4)), k=2)
    with pytest.raises(ValueError):
        ba.neighbour_overlap(np.zeros((5, 3)), np.zeros((5, 3)), k=5)


def test_validation_split_is_seeded_sized_and_skips_the_calibration_prefix():
    texts = [f"t{i}" for i in range(500)]
    labels = np.arange(500)
    a_texts, a_labels = ba.validation_split((texts, labels), n=100, skip=256, seed=1)
    b_texts, _ = ba.validation_split((texts, labels), n=100, skip=256, seed=1)
    assert a_texts == b_texts and len(set(a_texts)) == 100
    assert a_labels.min() >= 256 and [f"t{i}" for i in a_labels] == a_texts
    assert ba.validation_split((texts, labels), n=100, skip=256, seed=2)[0] != a_texts
    with pytest.raises(ValueError):
        ba.validation_split((texts, labels), n=300, skip=256)


def test_row_names_say_what_differs_from_the_defaults():
    assert ba.row_name("optin", 32, 8, 1.0) == "optin"
    assert ba.row_name("optin", 128, 8, 0.1) == "optin (cal 128, lam 0.1)"
    assert ba.row_name("optin+ls", 32, 1, 1.0) == "optin+ls (ng 1)"
    assert ba.row_name("magnitude", 128, 1, 10.0) == "magnitude"  # uses no calibration
    assert ba.row_name("onnxsim-wanda", 64, 8, 1.0) == "onnxsim-wanda (cal 64)"
    assert ba.row_name("optin", 64, 8, 10.0, 0.1) == "optin (cal 64, lam 10, rounds of 0.1)"
    assert ba.row_name("magnitude", 32, 8, 1.0, 0.1) == "magnitude"


def test_one_chain_of_rounds_serves_every_level():
    """Each level's prefix of the chain is the schedule prune(steps=...) would run for it."""
    from optin_onnx.iterate import budgets

    levels = [0.9, 0.8, 0.7, 0.6, 0.5]
    got = ba.chain(levels, 0.1)
    np.testing.assert_allclose(got, levels)
    for level in levels:
        steps = round((1 - level) / 0.1)
        np.testing.assert_allclose(got[:steps], budgets(level, steps))
    np.testing.assert_allclose(ba.chain([0.6], 0.1), [0.9, 0.8, 0.7, 0.6])
    with pytest.raises(SystemExit, match="whole number of steps"):
        ba.chain([0.65], 0.1)


def _record(kind: str = "logits") -> dict:
    row = {"level": 0.6, "flops_kept": 0.6, "seconds": 2.0}
    if kind == "logits":
        row.update(accuracy=0.9, agreement=0.95, kl_to_dense=0.1)
        dense = {"accuracy": 0.92, "agreement": 1.0, "kl_to_dense": 0.0}
    else:
        row.update(cosine=0.8, neighbour_overlap=0.5)
        dense = {"cosine": 1.0, "neighbour_overlap": 1.0}
    return {"model": "m (x)", "kind": kind, "split": "test", "calibration_texts": 32,
            "eval_texts": 10, "seq_len_for_flops": 16, "dense": dense, "command": "cmd",
            "methods": {"optin": [row], "onnxsim-heads": [
                {"level": 0.6, "flops_kept": 0.69, "seconds": 4.0,
                 "note": "cannot reach (closest 0.69)"}]},
            "score_seconds": {"optin": 90.0, "onnxsim-heads": 3.0}}


def test_table_cells_times_and_notes():
    t = ba.table(_record())
    assert "| optin | 90 + 2.0 | 90.0 (-2.00; agr 95, KL 0.100) |" in t
    assert "| onnxsim-heads | 3 + 4.0 | cannot reach (closest 0.69) |" in t
    e = ba.table(_record("embedding"))
    assert "| optin | 90 + 2.0 | 0.800 (NN 50) |" in e


def test_update_results_replaces_only_its_own_block(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("intro\n<!-- accuracy:embedding -->\nold\n"
                       "<!-- /accuracy:embedding -->\ntail\n")
    ba.update_results(_record("embedding"), "embedding", results)
    text = results.read_text()
    assert text.startswith("intro\n<!-- accuracy:embedding -->\n10 held-out texts")
    assert "old" not in text and text.endswith("<!-- /accuracy:embedding -->\ntail\n")
    assert "Command: `cmd`" in text and ".png" not in text  # one level: a table, no plot
    record = _record("embedding")
    row = record["methods"]["optin"][0]
    record["methods"] = {"optin": [row, {**row, "level": 0.5}]}
    ba.update_results(record, "embedding", results)
    assert "](bench/accuracy_embedding.png)\n<!-- /accuracy:embedding -->" in results.read_text()
