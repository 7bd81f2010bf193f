"""Calibration for decoders (issue 9): the structural key/value cache detector and the empty past
that fills a calibration set lacking the cache inputs."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optin_onnx.errors import OptinError
from optin_onnx.io import cache_inputs, calibration_for, empty_past
from tests.test_cli import call

zoo = pytest.importorskip("models.zoo")


@pytest.fixture(scope="module")
def cache_exports(tmp_path_factory) -> dict[str, Path]:
    """The zoo's Llama with its KV cache as graph inputs, exported with both exporters."""
    root = tmp_path_factory.mktemp("llama_cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {ex: zoo.export(zoo.ZOO["llama-cache"]("default"), root / f"{ex}.onnx", ex)
                for ex in zoo.EXPORTERS}


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zoo.export(zoo.ZOO["bert"]("default"),
                          tmp_path_factory.mktemp("bert") / "bert.onnx", "torchscript")


def token_ids(n: int, seq: int) -> dict[str, np.ndarray]:
    """Token ids inside the zoo's vocabulary, the odd rows right-padded."""
    ids = np.random.default_rng(0).integers(2, zoo.VOCAB, (n, seq))
    mask = np.ones_like(ids)
    mask[1::2, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- the detector ---------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_detector_finds_every_cache_input(cache_exports, exporter):
    model = ir.load(cache_exports[exporter])
    found = cache_inputs(model)
    assert found == {f"past.{i}.{kind}": 2 for i in range(zoo.LAYERS) for kind in ("key", "value")}


def test_detector_finds_nothing_in_an_encoder_or_a_cnn(bert_export, tmp_path):
    from models.cnn import export_tiny_cnn

    assert cache_inputs(ir.load(bert_export)) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnn = export_tiny_cnn(tmp_path / "cnn.onnx")
    assert cache_inputs(ir.load(cnn)) == {}


def cache_graph(past_dims: list, through_cast: bool = True) -> ir.Model:
    """A one-layer cache graph whose input names say nothing: ``a`` [batch, 2, past, 4] is cast
    (or passed through an Identity), concatenated on axis -2 with ``Relu(x)`` (the new keys) and
    returned through an Identity; ``b``, a float input concatenated the same way, only feeds a
    sum, which is the other graph output."""
    nodes = [helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT) if through_cast else
             helper.make_node("Identity", ["a"], ["a32"]),
             helper.make_node("Relu", ["x"], ["new"]),
             helper.make_node("Concat", ["a32", "new"], ["cat"], axis=-2),
             helper.make_node("Identity", ["cat"], ["present"]),
             helper.make_node("Concat", ["b", "new"], ["bcat"], axis=-2),
             helper.make_node("ReduceSum", ["bcat"], ["total"], keepdims=0)]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, past_dims),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 2, "p", 4]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "s", 4])]
    outputs = [helper.make_tensor_value_info("present", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("total", TensorProto.FLOAT, None)]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(proto)


@pytest.mark.parametrize("through_cast", [True, False])
def test_detector_is_structural(through_cast):
    # "b" is concatenated too, but that Concat does not reach a graph output; "x" reaches the
    # present output only through a Relu.
    model = cache_graph(["batch", 2, "past", 4], through_cast)
    assert cache_inputs(model) == {"a": 2}
    past = empty_past(model, 5)
    assert list(past) == ["a"]
    assert past["a"].shape == (5, 2, 0, 4) and past["a"].dtype == np.float32


def test_empty_past_refuses_a_symbolic_non_batch_axis():
    model = cache_graph(["batch", "heads", "past", 4])
    with pytest.raises(OptinError, match=r"cache input 'a' has a symbolic axis 1 \(heads\)") as e:
        empty_past(model, 2)
    assert "\n" not in str(e.value)


# -- the empty past in analyze / prune's calibration -------------------------------------------

@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_calibration_without_the_past_gets_an_empty_one_and_runs(cache_exports, exporter):
    path = cache_exports[exporter]
    arrays = calibration_for(ir.load(path), token_ids(3, 7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert list(arrays) == [i.name for i in session.get_inputs()]
    for i in range(zoo.LAYERS):
        assert arrays[f"past.{i}.key"].shape == (3, zoo.KV_HEADS, 0, zoo.HEAD_DIM)
    hidden, *present = session.run(None, arrays)
    assert hidden.shape == (3, 7, zoo.HIDDEN) and np.isfinite(hidden).all()
    assert all(p.shape == (3, zoo.KV_HEADS, 7, zoo.HEAD_DIM) for p in present)


def test_a_partial_past_and_other_missing_inputs_are_refused(cache_exports, tmp_path):
    model = ir.load(cache_exports["torchscript"])
    feeds = token_ids(2, 5)
    partial = {**feeds, "past.0.key": np.zeros((2, zoo.KV_HEADS, 0, zoo.HEAD_DIM), np.float32)}
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(OptinError, match="some key/value cache inputs but not 'past.0.value'"):
        calibration_for(model, tmp_path / "partial.npz")
    np.savez(tmp_path / "no_mask.npz", input_ids=feeds["input_ids"])
    with pytest.raises(OptinError, match="no array for graph input 'attention_mask'"):
        calibration_for(model, tmp_path / "no_mask.npz")
    with pytest.raises(OptinError, match="no array for graph input 'attention_mask'"):
        calibration_for(model, {"input_ids": feeds["input_ids"]})


def test_analyze_runs_on_a_calibration_file_without_the_past(cache_exports, tmp_path, capsys):
    np.savez(tmp_path / "tokens.npz", **token_ids(4, 9))
    code, out, err = call(["analyze", cache_exports["torchscript"], "--calib",
                           tmp_path / "tokens.npz"], capsys)
    assert code == 0, err
    assert "MACs" in out and "declined" in out  # heads on the cache are declined for now
