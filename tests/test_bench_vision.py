"""The CNN benchmark (tools/bench_vision.py and its engine, tools/bench/): its metrics and the
docs block it writes (the runs themselves are long)."""
from __future__ import annotations

import numpy as np
import pytest

from tools.bench.metrics import classification
from tools.bench.results import latency_table, vision_block, vision_table


def metrics(logits: np.ndarray, dense: np.ndarray, labels: np.ndarray | None) -> dict:
    """The vision targets' metrics: classification with top-5 agreement."""
    return classification(logits, dense, labels, top5=True)


def test_metrics_agreement_top5_and_accuracy() -> None:
    dense = np.array([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [0, 0, 5.0, 1, 0, 0]])
    pruned = dense.copy()
    pruned[1] = [0, 1, 5.0, 0, 0, 0]  # top-1 moves, the dense top-1 is still in the top 5
    pruned[2] = [0, 0, -9.0, 5, 4, 3]  # the dense top-1 falls out of the top 5
    got = metrics(pruned, dense, np.array([0, 2, 2]))
    assert got["agreement"] == pytest.approx(1 / 3)
    assert got["top5_agreement"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["kl_to_dense"] > 0
    same = metrics(dense, dense, None)
    assert same == {"agreement": 1.0, "top5_agreement": 1.0, "kl_to_dense": 0.0}


def _record(labels: bool) -> dict:
    row = {"agreement": 0.9, "top5_agreement": 0.99, "kl_to_dense": 0.05, "flops_kept": 0.61,
           "level": 0.6}
    dense = {"agreement": 1.0, "top5_agreement": 1.0, "kl_to_dense": 0.0}
    if labels:
        row["accuracy"], dense["accuracy"] = 0.8, 0.83
    return {"model": "m", "dense": dense, "eval_images": 10, "calibration_images": 4, "blocks": 2,
            "channels": 24, "dense_macs": 2e6, "channel_multiple": 8, "command": "cmd",
            "methods": {"optin": [row]}, "score_seconds": {"optin": 3.2},
            "latency": {"0.6": {"flops_kept": 0.61,
                                "b1": {"before_ms": 2.0, "after_ms": 1.0, "speedup": 2.0}}}}


def test_table_headline_is_accuracy_with_labels_else_agreement() -> None:
    assert "| optin | 3 s | 80.0 (agr 90, KL 0.050; FLOPs 0.61) |" in vision_table(_record(True))
    assert "| optin | 3 s | 90.0 (top-5 99, KL 0.050; FLOPs 0.61) |" in vision_table(_record(False))
    assert "| 0.61 | 1.64x | 2.0 -> 1.0 ms (2.00x) |" in latency_table(_record(False))


def test_rows_at_other_levels_leave_blank_cells() -> None:
    record = _record(True)
    row = dict(record["methods"]["optin"][0], level=0.8, flops_kept=0.8)
    record["methods"]["optin (rounds of 0.1, teacher current)"] = [row]
    record["score_seconds"]["optin (rounds of 0.1, teacher current)"] = 9.0
    text = vision_table(record)
    assert "| method | score time | 0.8 | 0.6 |" in text
    assert "| optin |  3 s |" not in text and "| optin | 3 s |  | 80.0" in text
    assert "| optin (rounds of 0.1, teacher current) | 9 s | 80.0 (agr 90, KL 0.050; FLOPs 0.80) |  |" in text


def test_vision_block_replaces_only_its_block(tmp_path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    vision_block(_record(True), "digits_mnist", results)
    vision_block(_record(False), "digits_mnist", results)  # again: replaced, not appended
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert text.count("<!-- vision:digits_mnist -->") == 1
    assert "top-1 agreement with the dense model" in text


def test_merge_keeps_earlier_rows(tmp_path, monkeypatch) -> None:
    import json

    import tools.bench.cli
    import tools.bench_vision as bv

    first, second = _record(True), _record(True)
    second["methods"] = {"magnitude": first["methods"]["optin"]}
    second["score_seconds"] = {"magnitude": 0.0}
    second["latency"] = {"0.5": {"flops_kept": 0.5,
                                 "b1": {"before_ms": 3.0, "after_ms": 2.0, "speedup": 1.5}}}
    records = iter([first, second])
    monkeypatch.setattr(bv, "bench", lambda args: dict(next(records)))
    monkeypatch.setattr(tools.bench.cli, "plot", lambda *args, **kwargs: None)
    bv.main(["digits", "--out", str(tmp_path / "bench")])
    bv.main(["digits", "--methods", "magnitude", "--merge", "--out", str(tmp_path / "bench")])
    merged = json.loads((tmp_path / "bench" / "vision_digits_mnist.json").read_text())
    assert set(merged["methods"]) == {"optin", "magnitude"}
    assert set(merged["latency"]) == {"0.6", "0.5"}
    assert "&&" in merged["command"]
