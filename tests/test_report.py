"""Tests for optin_onnx.report: parameter counting, latency, fidelity metrics, the report record."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import report as rp
from optin_onnx.errors import OptinError
from optin_onnx.report import (
    LatencyStats,
    Report,
    compare_latency,
    cosine_similarity,
    count_parameters,
    kl_divergence,
    latency_entry,
    measure_latency,
    render,
    top1_agreement,
)


def _param_model() -> onnx.ModelProto:
    """W (4x3 float) feeds a MatMul; a Reshape uses an int64 shape; Constants of each kind."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y"]),
        helper.make_node("Reshape", ["Y", "shape"], ["R"]),
        helper.make_node(
            "Constant", [], ["bias"], value=numpy_helper.from_array(np.ones(3, np.float32))
        ),
        helper.make_node(
            "Constant", [], ["eps"], value=numpy_helper.from_array(np.array(1e-5, np.float32))
        ),
        helper.make_node(
            "Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0, 1], np.int64))
        ),
        helper.make_node("Add", ["R", "bias"], ["A"]),
        helper.make_node("Add", ["A", "eps"], ["Z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "params",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 3])],
        initializer=[w, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


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


# --- count_parameters ------------------------------------------------------------------------------


def test_count_parameters_counts_float_weights_not_shapes_or_scalars():
    # 12 (W) + 3 (bias Constant); the int64 shape initializer, the int64 Constant and the scalar
    # epsilon Constant are not parameters.
    assert count_parameters(_param_model()) == 15


def test_count_parameters_without_external_data_loaded(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_param_model(), path, save_as_external_data=True, size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert count_parameters(model) == 15


def test_count_parameters_includes_subgraphs():
    inner_w = numpy_helper.from_array(np.ones((2, 5), np.float32), "inner_w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["inner_w"], ["out"])],
        "body",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5])],
        initializer=[inner_w],
    )
    model = _param_model()
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["branch"], then_branch=body, else_branch=body)
    )
    assert count_parameters(model) == 15 + 2 * 10


# --- fidelity --------------------------------------------------------------------------------------


def test_kl_identical_is_zero():
    logits = np.random.default_rng(1).standard_normal((8, 10)).astype(np.float32)
    assert kl_divergence(logits, logits) == 0.0


def test_kl_matches_hand_computed_value():
    # Sample 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Sample 1: identical, KL = 0. The mean over samples is 1/4 ln(4/3).
    teacher = np.log([[0.5, 0.5], [0.2, 0.8]])
    student = np.log([[0.25, 0.75], [0.2, 0.8]])
    assert kl_divergence(teacher, student) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-12)
    # Softmax is shift-invariant, so adding a constant to the logits changes nothing.
    assert kl_divergence(teacher + 7.0, student - 3.0) == pytest.approx(0.25 * math.log(4 / 3))


def test_kl_is_stable_for_large_logits():
    teacher = np.array([[1000.0, 0.0]], np.float32)
    student = np.array([[0.0, 1000.0]], np.float32)
    value = kl_divergence(teacher, student)
    assert math.isfinite(value) and value == pytest.approx(1000.0)


def test_kl_per_token_logits_average_over_all_positions():
    teacher = np.log(np.array([[[0.5, 0.5], [0.2, 0.8]]]))  # (batch 1, 2 tokens, 2 classes)
    student = np.log(np.array([[[0.25, 0.75], [0.2, 0.8]]]))
    assert kl_divergence(teacher, student) == pytest.approx(0.25 * math.log(4 / 3))


def test_cosine_identical_and_orthogonal():
    a = np.random.default_rng(2).standard_normal((4, 3, 5))
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert cosine_similarity(a, 3.0 * a) == pytest.approx(1.0)
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([[0.0, 5.0], [-1.0, 0.0]])
    assert cosine_similarity(x, y) == pytest.approx(0.0)
    # Mean over rows: one identical row (1) and one opposite row (-1).
    assert cosine_similarity(x, np.array([[1.0, 0.0], [0.0, -2.0]])) == pytest.approx(0.0)
    assert cosine_similarity(x, np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(
        (1 + 1 / math.sqrt(2)) / 2
    )


def test_cosine_zero_vectors():
    zeros = np.zeros((1, 3))
    assert cosine_similarity(zeros, zeros) == 1.0
    assert cosine_similarity(zeros, np.ones((1, 3))) == 0.0


def test_top1_agreement():
    teacher = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    student = np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.9, 0.1]])
    assert top1_agreement(teacher, student) == pytest.approx(0.75)


def test_fidelity_shape_mismatch_is_an_optin_error():
    with pytest.raises(OptinError, match="kl_divergence"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(OptinError, match="cosine_similarity"):
        cosine_similarity(np.zeros((2, 3)), np.zeros((3, 2)))


# --- latency ---------------------------------------------------------------------------------------


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

    monkeypatch.setattr(rp, "_session", lambda model, providers, threads: FakeSession(model))
    compare_latency("A", "B", FEEDS, warmup=2, repeats=3)
    assert calls == ["A", "B"] * 5


def test_latency_entry_uses_medians():
    entry = latency_entry(LatencyStats(3.0, 4.0, 3.1, 10), LatencyStats(2.0, 2.5, 2.1, 10))
    assert entry == {"before_ms": 3.0, "after_ms": 2.0, "speedup": 1.5}


# --- Report ----------------------------------------------------------------------------------------


def _report() -> Report:
    return Report(
        input_path="models/minilm.onnx",
        output_path="out/minilm-pruned.onnx",
        flops_target=0.4,
        flops_achieved=np.float64(0.38),
        seq_len=128,
        macs_before=2_900_000_000,
        macs_after=1_800_000_000,
        params_before=22_713_216,
        params_after=np.int64(17_000_000),
        size_before=90_900_000,
        size_after=68_000_000,
        layers=[
            {"block": "/encoder/layer.0/attention", "kind": "attention", "units_before": 12,
             "units_after": 8, "unit": "heads"},
            {"block": "/encoder/layer.0/mlp[bold]", "kind": "mlp", "units_before": 1536,
             "units_after": 1536, "unit": "neurons"},
        ],
        latency={"cpu b1 s128": {"before_ms": 12.0, "after_ms": 8.0, "speedup": 1.5}},
        fidelity={"kl": 0.0123, "cosine": 0.9987, "top1": 0.97},
        verify={"max_abs_err": 3.2e-6, "tolerance": 1e-4, "cases": [(1, 16), (2, 128)],
                "passed": True},
        stage_seconds={"analyse": 1.5, "score": 30.0, "slim": 2.0, "verify": 4.5},
        declined=["/encoder/layer.5/attention: output feeds a custom op"],
        notes=["latency measured on 2 threads"],
    )


def test_report_json_round_trip_and_no_temp_file(tmp_path):
    report = _report()
    path = tmp_path / "report.json"
    report.to_json(path)
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    assert loaded == report.to_dict()
    assert loaded["verify"]["cases"] == [[1, 16], [2, 128]]
    assert loaded["params_after"] == 17_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    # Overwriting an existing report is atomic too.
    report.notes.append("second write")
    report.to_json(path)
    assert json.loads(path.read_text())["notes"][-1] == "second write"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_report_to_dict_nonfinite_becomes_null():
    report = _report()
    report.fidelity["kl"] = float("inf")
    assert report.to_dict()["fidelity"]["kl"] is None


def test_render_contains_key_rows_and_numbers():
    text = render(_report())
    for expected in (
        "MACs", "2.90 G", "1.80 G", "Parameters", "22.71 M", "File size", "86.69 MiB",
        "Latency cpu b1 s128", "12.00 ms", "8.00 ms", "1.50x",
        "/encoder/layer.0/attention", "12 -> 8 heads", "1536 -> 1536 neurons", "67%",
        "kl", "0.0123", "PASSED", "1x16, 2x128", "score", "30.00", "total",
        "output feeds a custom op", "latency measured on 2 threads",
        "40.0%", "38.0%", "128",
    ):
        assert expected in text, expected
    # Names from the model are shown literally, never read as rich markup.
    assert "/encoder/layer.0/mlp[bold]" in text
    assert "\x1b[" not in text


def test_render_failed_verify_and_empty_sections():
    report = _report()
    report.verify["passed"] = False
    assert "FAILED" in render(report)
    report.verify = {}
    report.layers, report.latency, report.fidelity = [], {}, {}
    report.stage_seconds, report.declined, report.notes = {}, [], []
    text = render(report)
    assert "Verify: not run" in text and "MACs" in text and "Declined" not in text


def test_print_report_writes_stdout(capsys):
    rp.print_report(_report())
    assert "1.50x" in capsys.readouterr().out


def test_report_module_does_not_import_torch():
    code = "import sys, optin_onnx.report; sys.exit('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0
