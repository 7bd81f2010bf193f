"""Model and calibration I/O: each bad input is one clear OptinError; saving never harms the input."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import io
from optin_onnx.errors import OptinError

QUANTISED = "quantised models are not supported: prune the fp32 model, then quantise"


def matmul_model(rows: int = 3, cols: int = 4, *, custom_domain: bool = False,
                 domain: str = "ai.onnx.ml", op: str = "Binarizer") -> onnx.ModelProto:
    """y = x @ W with W an fp32 initializer; optionally followed by ``op`` of another domain."""
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")]
    opsets = [helper.make_opsetid("", 17)]
    output = "y"
    if custom_domain:
        nodes.append(helper.make_node(op, ["y"], ["z"], name="custom", domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
        output = "z"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, rows])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, cols])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=opsets, producer_name="test")


def write(path: Path, proto: onnx.ModelProto) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def weight(model: ir.Model) -> np.ndarray:
    return model.graph.initializers["W"].const_value.numpy()


def error_of(path: Path) -> str:
    with pytest.raises(OptinError) as caught:
        io.load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- load_model: valid input ---------------------------------------------------------------------


def test_load_valid_model(tmp_path: Path) -> None:
    model = io.load_model(write(tmp_path / "m.onnx", matmul_model()))
    assert io.graph_input_names(model) == ["x"]
    np.testing.assert_array_equal(weight(model), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_graph_input_names_leave_out_initializers_listed_as_inputs(tmp_path: Path) -> None:
    proto = matmul_model()
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4]))
    assert io.graph_input_names(io.load_model(write(tmp_path / "m.onnx", proto))) == ["x"]


# --- load_model: bad input -----------------------------------------------------------------------


def test_missing_model(tmp_path: Path) -> None:
    assert "does not exist" in error_of(tmp_path / "nope.onnx")


def test_empty_model_file(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    assert "is empty" in error_of(tmp_path / "m.onnx")


def test_text_file_is_not_onnx(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"hello")
    message = error_of(tmp_path / "m.onnx")
    assert "not an ONNX file" in message and "m.onnx" in message


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_rejected(tmp_path: Path, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size=512, dtype=np.uint8).tobytes()
    (tmp_path / "m.onnx").write_bytes(data)
    error_of(tmp_path / "m.onnx")


def test_first_half_of_a_model_is_truncated(tmp_path: Path) -> None:
    data = matmul_model().SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_of(tmp_path / "m.onnx")


def test_every_truncation_point_is_reported_as_truncated(tmp_path: Path) -> None:
    # Protobuf parses a file cut at a field boundary without complaint (e.g. cut just before
    # opset_import, or between two opset imports), so this sweeps every cut point.
    data = matmul_model(custom_domain=True).SerializeToString()
    path = tmp_path / "m.onnx"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        assert "truncated" in error_of(path), f"cut at byte {cut} of {len(data)}"


def test_an_unimported_onnxruntime_domain_is_imported_not_refused(tmp_path: Path) -> None:
    # onnxruntime's transformer optimizer returns fused graphs without the com.microsoft import
    # (onnxruntime runs them anyway): the working model imports it, so what is written is valid.
    model = matmul_model(custom_domain=True, domain="com.microsoft", op="FastGelu")
    del model.opset_import[1]
    loaded = io.load_model(write(tmp_path / "m.onnx", model))
    assert loaded.opset_imports.get("com.microsoft") == 1


def test_dequantize_linear_is_quantised(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"], name="dq"),
            helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(np.ones((3, 4), dtype=np.int8), "Wq"),
            numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "zero"),
        ],
    )
    message = error_of(write(tmp_path / "m.onnx", helper.make_model(graph)))
    assert QUANTISED in message and "DequantizeLinear" in message


def test_matmul_integer_with_int8_weight_is_quantised(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "Wq"], ["y"], name="mmi")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4])],
        [numpy_helper.from_array(np.ones((3, 4), dtype=np.int8), "Wq")],
    )
    message = error_of(write(tmp_path / "m.onnx", helper.make_model(graph)))
    assert QUANTISED in message and "MatMulInteger" in message


def test_int8_weight_cast_into_matmul_is_quantised(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["Wq"], ["W"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((3, 4), dtype=np.int8), "Wq")],
    )
    message = error_of(write(tmp_path / "m.onnx", helper.make_model(graph)))
    assert QUANTISED in message and "'Wq' feeds MatMul" in message


def test_model_without_nodes(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    )
    assert "no nodes" in error_of(write(tmp_path / "m.onnx", helper.make_model(graph)))


def test_model_without_inputs(tmp_path: Path) -> None:
    proto = matmul_model()
    proto.graph.node[0].input[0] = "W"
    proto.graph.node[0].input[1] = "W2"
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W2"))
    del proto.graph.input[:]
    assert "no graph inputs" in error_of(write(tmp_path / "m.onnx", proto))


# --- external data -------------------------------------------------------------------------------


def write_external(path: Path, location: str) -> Path:
    """A model whose 16x32 weight (over ir.save's 256-byte inline limit) lives in ``location``."""
    onnx.save_model(
        matmul_model(16, 32), path, save_as_external_data=True, location=location, size_threshold=0
    )
    assert (path.parent / location).is_file()
    return path


def test_missing_external_data(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m.onnx", "m.data")
    (tmp_path / "m.data").unlink()
    message = error_of(path)
    assert "external data file" in message and "m.data" in message and "does not exist" in message


def test_truncated_external_data(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m.onnx", "m.data")
    data = (tmp_path / "m.data").read_bytes()
    (tmp_path / "m.data").write_bytes(data[: len(data) // 2])
    assert "is truncated" in error_of(path)


def test_external_data_round_trip_leaves_input_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_external(tmp_path / "in.onnx", "in.data")
    before = {name: (tmp_path / name).read_bytes() for name in ("in.onnx", "in.data")}
    expected = np.arange(16 * 32, dtype=np.float32).reshape(16, 32)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)  # as if the model were > 2 GB
    model = io.load_model(source)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)

    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    io.save_model(model, out, input_path=source)

    assert sorted(os.listdir(out.parent)) == ["pruned.onnx", "pruned.onnx.data"]
    reference = onnx.load(out, load_external_data=False).graph.initializer[0]
    locations = {entry.key: entry.value for entry in reference.external_data}
    assert locations["location"] == "pruned.onnx.data"
    np.testing.assert_array_equal(weight(io.load_model(out)), expected)
    # The caller's model still reads lazily from the input, and the input is byte-identical.
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert {name: (tmp_path / name).read_bytes() for name in ("in.onnx", "in.data")} == before


def test_small_model_with_external_data_runs_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dynamo exporter keeps weights beside the model at any size: under the threshold they
    are read at load time, so onnxruntime (fed bytes) never looks them up elsewhere."""
    from optin_onnx.runtime import session

    source = write_external(tmp_path / "in.onnx", "in.data")
    model = io.load_model(source)
    assert not isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    monkeypatch.chdir(tmp_path.parent)
    sess = session(ir.to_proto(model))
    feeds = {i.name: np.ones([d if isinstance(d, int) else 2 for d in i.shape], np.float32)
             for i in sess.get_inputs()}
    assert all(np.isfinite(o).all() for o in sess.run(None, feeds))


def test_small_model_from_external_input_is_saved_self_contained(tmp_path: Path) -> None:
    source = write_external(tmp_path / "in.onnx", "in.data")
    model = io.load_model(source)
    out = tmp_path / "out.onnx"
    io.save_model(model, out, input_path=source)
    (tmp_path / "in.data").unlink()  # the output must not depend on the input's data file
    saved = onnx.load(out, load_external_data=False)
    assert not saved.graph.initializer[0].external_data
    np.testing.assert_array_equal(
        weight(io.load_model(out)), np.arange(16 * 32, dtype=np.float32).reshape(16, 32)
    )


def test_refuses_to_overwrite_the_inputs_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # in.onnx keeps its weights in "out.onnx.data": exactly the data file saving out.onnx would write.
    source = write_external(tmp_path / "in.onnx", "out.onnx.data")
    before = (tmp_path / "out.onnx.data").read_bytes()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    with pytest.raises(OptinError, match="refusing to overwrite the input"):
        io.save_model(io.load_model(source), tmp_path / "out.onnx", input_path=source)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx.data"]


def test_external_constant_attribute_is_inlined_on_save(tmp_path: Path) -> None:
    # onnx can also move Constant node values to external data; ir.save would keep those as
    # references to the input's data file, so save_model copies them in.
    value = np.arange(16 * 32, dtype=np.float32).reshape(16, 32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(value, "W")),
            helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
    )
    source = tmp_path / "in.onnx"
    onnx.save_model(
        helper.make_model(graph),
        source,
        save_as_external_data=True,
        location="in.data",
        size_threshold=0,
        convert_attribute=True,
    )
    model = io.load_model(source)
    io.save_model(model, tmp_path / "out.onnx", input_path=source)
    assert isinstance(model.graph.node(0).attributes["value"].value, ir.ExternalTensor)
    (tmp_path / "in.data").unlink()
    saved = io.load_model(tmp_path / "out.onnx")
    np.testing.assert_array_equal(saved.graph.node(0).attributes["value"].value.numpy(), value)
    with pytest.raises(OptinError, match="in.data .*does not exist"):
        io.load_model(source)


# --- save_model ----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = io.load_model(write(tmp_path / "in.onnx", matmul_model()))
    io.save_model(model, tmp_path / "out.onnx", input_path=tmp_path / "in.onnx")
    np.testing.assert_array_equal(weight(io.load_model(tmp_path / "out.onnx")), weight(model))


def test_save_accepts_model_proto(tmp_path: Path) -> None:
    io.save_model(matmul_model(), tmp_path / "out.onnx")
    saved = io.load_model(tmp_path / "out.onnx")
    assert [node.op_type for node in saved.graph] == ["MatMul"]
    np.testing.assert_array_equal(weight(saved), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_model_proto_matches_saved_model(tmp_path: Path) -> None:
    model = io.load_model(write(tmp_path / "in.onnx", matmul_model()))
    proto = io.model_proto(model)
    assert isinstance(proto, onnx.ModelProto)
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), weight(model))


def test_refuses_output_equal_to_input(tmp_path: Path) -> None:
    source = write(tmp_path / "m.onnx", matmul_model())
    before = source.read_bytes()
    model = io.load_model(source)
    for output in (source, tmp_path / "." / "m.onnx", str(source)):
        with pytest.raises(OptinError, match="output path .* is the input path: refusing to overwrite"):
            io.save_model(model, output, input_path=source)
    os.symlink(source, tmp_path / "link.onnx")
    with pytest.raises(OptinError, match="is the input path"):
        io.save_model(model, tmp_path / "link.onnx", input_path=source)
    assert source.read_bytes() == before


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    io.save_model(matmul_model(), tmp_path / "out.onnx")
    io.save_model(matmul_model(5, 6), tmp_path / "out.onnx")  # replacing an existing output
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert weight(io.load_model(tmp_path / "out.onnx")).shape == (5, 6)


def test_failed_save_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    io.save_model(matmul_model(), out)
    before = out.read_bytes()

    def disk_full(model: ir.Model, path: str, **kwargs: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", disk_full)
    with pytest.raises(OptinError, match="cannot write .*out.onnx: No space left on device"):
        io.save_model(matmul_model(5, 6), out)
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OptinError, match="does not exist"):
        io.save_model(matmul_model(), tmp_path / "missing" / "out.onnx")


# --- load_calibration ----------------------------------------------------------------------------


def test_calibration_round_trip_ignores_extras_and_keeps_dtypes(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    mask = np.ones((4, 3), dtype=np.int32)
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=mask, labels=np.zeros(4))
    arrays = io.load_calibration(tmp_path / "c.npz", ["input_ids", "attention_mask"])
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert arrays["input_ids"].dtype == np.int64 and arrays["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(arrays["input_ids"], ids)


def calibration_error(path: Path, names: list[str]) -> str:
    with pytest.raises(OptinError) as caught:
        io.load_calibration(path, names)
    return str(caught.value)


def test_calibration_missing_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", input_ids=np.zeros((2, 3)), attention_mask=np.zeros((2, 3)))
    message = calibration_error(tmp_path / "c.npz", ["input_ids", "token_type_ids"])
    assert "has no array for graph input 'token_type_ids'" in message
    assert "input_ids, attention_mask" in message


def test_calibration_mismatched_sample_counts(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", a=np.zeros((8, 3)), b=np.zeros((4, 3)))
    message = calibration_error(tmp_path / "c.npz", ["a", "b"])
    assert "different sample counts" in message and "a: 8" in message and "b: 4" in message


def test_calibration_zero_samples(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", a=np.zeros((0, 3)))
    assert "zero samples" in calibration_error(tmp_path / "c.npz", ["a"])


def test_calibration_scalar_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", a=np.float32(1.0))
    assert "scalar" in calibration_error(tmp_path / "c.npz", ["a"])


def test_calibration_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in calibration_error(tmp_path / "c.npz", ["a"])


def test_calibration_not_npz(tmp_path: Path) -> None:
    (tmp_path / "c.npz").write_text("input_ids,attention_mask\n1,1\n")
    assert "is not an .npz archive" in calibration_error(tmp_path / "c.npz", ["a"])


def test_calibration_npy_instead_of_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.zeros((2, 3)))
    assert "is not an .npz archive" in calibration_error(tmp_path / "c.npy", ["a"])


def test_calibration_truncated(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", a=np.zeros((20, 30)))
    data = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    assert "is not an .npz archive (or it is truncated)" in calibration_error(tmp_path / "c.npz", ["a"])


def test_calibration_corrupt_member(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "c.npz", a=np.random.default_rng(0).random((20, 30)))
    data = bytearray((tmp_path / "c.npz").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 50] = b"\xff" * 50
    (tmp_path / "c.npz").write_bytes(bytes(data))
    assert "is corrupt" in calibration_error(tmp_path / "c.npz", ["a"])
