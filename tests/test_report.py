"""Tests for optin_onnx.report: parameter counting, the report record and its rendering."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import report as rp
from optin_onnx.report import Report, count_parameters, render


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
