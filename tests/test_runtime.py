"""optin_onnx.runtime: the one place sessions are opened and run."""
from __future__ import annotations

import os
import platform
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx.errors import OptinError
from optin_onnx.runtime import (first_output, heap_kept, one_blas_thread, release_memory,
                                run_all_values, run_batched, session, tensor_bytes)


def _model() -> onnx.ModelProto:
    """X [N, 4] -> Y = X @ W -> Z = Relu(Y)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Relu", ["Y"], ["Z"])],
        "m", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)


def test_outputs_chooses_what_a_session_returns_without_touching_the_model():
    model = _model()
    y, z = session(model, outputs=["Y", "Z"]).run(None, {"X": X})
    np.testing.assert_allclose(np.maximum(y, 0), z)
    assert [o.name for o in model.graph.output] == ["Z"]
    # The declared output keeps its type and shape, also when a load fails half-way.
    before = model.graph.output[0].SerializeToString()
    with pytest.raises(OptinError, match="could not load"):
        session(model, outputs=["Y", "nowhere"])
    assert [o.SerializeToString() for o in model.graph.output] == [before]
    np.testing.assert_allclose(session(model).run(None, {"X": X})[0], z)


def test_release_memory_keeps_every_session_working():
    sess = session(_model())
    want = sess.run(None, {"X": X})[0]
    release_memory()
    np.testing.assert_array_equal(sess.run(None, {"X": X})[0], want)


def test_run_all_values_returns_every_value_by_name():
    values = run_all_values(_model(), {"X": X})
    assert set(values) == {"Y", "Z"}
    assert set(run_all_values(_model(), {"X": X}, names=["Y"])) == {"Y", "Z"}


def test_a_failed_run_or_a_missing_file_is_an_optin_error(tmp_path):
    with pytest.raises(OptinError, match="could not run"):
        run_all_values(_model(), {"X": X[:, :2]})
    with pytest.raises(OptinError, match="not found"):
        session(tmp_path / "missing.onnx")


def test_batched_runs_equal_one_run_and_ignore_feeds_the_model_does_not_take():
    whole = session(_model()).run(None, {"X": X})[0]
    np.testing.assert_allclose(run_batched(_model(), {"X": X}, 3), whole, rtol=1e-6)
    batches = ({"X": X[i:i + 4], "unused": X} for i in range(0, len(X), 4))
    np.testing.assert_allclose(first_output(session(_model()), batches), whole, rtol=1e-6)


def test_tensor_bytes_counts_every_stored_tensor_without_serialising():
    """Initializers, Constant attributes and subgraph constants, by their shapes and types: what
    the memory check and the report use where protobuf's ByteSize would serialise the model (and
    raise past 2 GB)."""
    model = _model()
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(
        np.ones((5, 2), np.float64)))
    branch = helper.make_graph([helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(
        np.zeros(7, np.int64)))], "b", [], [helper.make_tensor_value_info("B", TensorProto.INT64,
                                                                          [7])])
    cond = helper.make_node("If", ["flag"], ["B_out"], then_branch=branch, else_branch=branch)
    model.graph.node.extend([const, cond])
    assert tensor_bytes(model) == 4 * 3 * 4 + 5 * 2 * 8 + 2 * 7 * 8
    assert tensor_bytes(_model()) == len(_model().graph.initializer[0].raw_data)


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _freed_block_stays(mib: int) -> float:
    """Resident MiB left behind by a block of ``mib`` MiB written and freed."""
    before = _resident_mib()
    block = np.ones(mib * 2 ** 18, np.float32)
    del block
    return _resident_mib() - before


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc's heap settings")
def test_heap_kept_keeps_freed_blocks_for_the_next_run_and_hands_them_back_after():
    release_memory()
    assert _freed_block_stays(96) < 16  # a large block is a mapping of its own, unmapped when freed
    with heap_kept():
        with heap_kept():  # nested blocks: the outer one decides
            pass
        kept = _freed_block_stays(96)
        assert kept > 80  # still in the heap for the next run
        again = _freed_block_stays(96)
        assert again < 16  # the next block reuses those pages: no new ones faulted in
        inside = _resident_mib()
    assert inside - _resident_mib() > 80  # handed back on leaving
    assert _freed_block_stays(96) < 16  # and the process is as before


def test_one_blas_thread_limits_numpy_inside_and_restores_after():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    np.ones((64, 64)) @ np.ones((64, 64))  # numpy's BLAS is loaded
    if not blas_threads():
        pytest.skip("numpy's BLAS is not one threadpoolctl controls")
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with one_blas_thread():
            assert set(blas_threads()) == {1}
        assert blas_threads() == before
