"""Tests for optin_onnx.latency: timing one model, two interleaved, and the report entry."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import latency
from optin_onnx.errors import OptinError
from optin_onnx.latency import LatencyStats, compare_latency, latency_entry, measure_latency


def _matmul_model(n: int = 16) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = {"X": np.ones((1, 16), np.float32)}


def test_measure_latency_positive_numbers():
    stats = measure_latency(_matmul_model(), FEEDS, warmup=1, repeats=5, threads=1)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 5
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0


def test_measure_latency_from_path(tmp_path):
    path = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(), path)
    assert measure_latency(path, FEEDS, warmup=0, repeats=3).runs == 3
    assert measure_latency(str(path), FEEDS, warmup=0, repeats=3).runs == 3


def test_measure_latency_respects_max_seconds():
    t0 = time.perf_counter()
    stats = measure_latency(_matmul_model(), FEEDS, warmup=100, repeats=100_000, max_seconds=1e-6)
    assert stats.runs == 3  # the budget is spent at once; the minimum of three timed runs remains
    assert time.perf_counter() - t0 < 10


def test_measure_latency_bad_input():
    with pytest.raises(OptinError, match="do not match"):
        measure_latency(_matmul_model(), {"wrong": FEEDS["X"]})
    with pytest.raises(OptinError, match="not found"):
        measure_latency("/nonexistent/model.onnx", FEEDS)
    with pytest.raises(OptinError, match="repeats"):
        measure_latency(_matmul_model(), FEEDS, repeats=0)


def test_compare_latency_runs_both():
    dense, pruned = compare_latency(_matmul_model(), _matmul_model(), FEEDS, warmup=1, repeats=4)
    assert dense.runs == pruned.runs == 4
    assert dense.median_ms > 0 and pruned.median_ms > 0


def test_compare_latency_interleaves(monkeypatch):
    calls: list[str] = []

    class FakeInput:
        name = "X"

    class FakeSession:
        def __init__(self, tag: str):
            self.tag = tag

        def get_inputs(self):
            return [FakeInput()]

        def run(self, outputs, feeds):
            calls.append(self.tag)

    monkeypatch.setattr(latency, "session", lambda model, providers, threads: FakeSession(model))
    compare_latency("A", "B", FEEDS, warmup=2, repeats=3)
    assert calls == ["A", "B"] * 5


def test_latency_entry_uses_medians():
    entry = latency_entry(LatencyStats(3.0, 4.0, 3.1, 10), LatencyStats(2.0, 2.5, 2.1, 10))
    assert entry == {"before_ms": 3.0, "after_ms": 2.0, "speedup": 1.5}
