"""The whole job, ``prune()``, end to end on two tiny export forms: the budget is met, the written
model is correct (verified against the masked dense graph), loadable, still dynamic, smaller, and
the input file is untouched."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optin_onnx.errors import OptinError
from optin_onnx.pipeline import PruneOptions, prune
from tests.helpers import form_id, run, tiny_feeds

FLOPS = 0.6
N_CALIB, CALIB_SEQ, N_SCORE = 24, 16, 16
STAGES = {"load", "analyse", "calibrate", "score", "search", "reconstruct", "rewrite", "canonicalize",
          "simplify", "verify", "report"}
FORMS = [("torchscript", "classifier", False), ("dynamo", "pool", True)]


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def io_dims(proto: onnx.ModelProto) -> list[tuple]:
    def dims(vi):
        return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
    return [(vi.name, dims(vi)) for vi in (*proto.graph.input, *proto.graph.output)]


@pytest.fixture(scope="module")
def pruned(tiny_exports, tmp_path_factory):
    """{form: (input path, input hash before, output path, PruneResult, calibration arrays)}.

    The torchscript form gets its calibration as an .npz path, the dynamo one as a dict."""
    out = {}
    feeds = tiny_feeds(N_CALIB, CALIB_SEQ, seed=5)
    for form in FORMS:
        d = tmp_path_factory.mktemp(form_id(form))
        src = d / "in.onnx"
        src.write_bytes(tiny_exports[form].read_bytes())
        before = sha256(src)
        calib = feeds
        if form[0] == "torchscript":
            calib = d / "calib.npz"
            np.savez(calib, **feeds)
        dst = d / "out.onnx"
        result = prune(src, calib, PruneOptions(flops=FLOPS, latency_cases=[(1, 16)],
                                                latency_seconds=1, samples=N_SCORE,
                                                reconstruct="refit"), output=dst)
        out[form] = (src, before, dst, result, feeds)
    return out


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_budget_is_met(pruned, form):
    _, _, _, result, feeds = pruned[form]
    r = result.report
    assert r.flops_target == FLOPS
    assert r.flops_achieved <= FLOPS + 1e-9
    assert r.flops_achieved >= FLOPS - 0.01
    assert r.flops_achieved == pytest.approx(r.macs_after / r.macs_before)
    # The search's prediction is what the written graph really costs.
    assert result.selection.fraction == pytest.approx(r.flops_achieved, rel=1e-9)
    # FLOPs are counted at the mean real length of the scoring samples (padding excluded).
    mean_length = feeds["attention_mask"][:N_SCORE].sum(1).mean()
    assert mean_length < CALIB_SEQ
    assert r.seq_len == int(round(mean_length))


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_verification_passed_on_four_cases_one_longer_than_calibration(pruned, form):
    _, _, _, result, _ = pruned[form]
    v = result.report.verify
    assert v["passed"] is True
    assert v["max_abs_err"] <= 1e-4
    assert v["tolerance"] == 1e-4
    assert len(v["cases"]) == 4
    sizes = [tuple(int(x) for x in c.split("x")) for c in v["cases"]]
    assert {b for b, _ in sizes} == {1, 3}
    assert max(s for _, s in sizes) > CALIB_SEQ, f"no case longer than the calibration: {sizes}"


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_output_is_written_atomically_and_loads(pruned, form):
    src, _, dst, result, feeds = pruned[form]
    assert dst.is_file()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(".")
                 or p.suffix == ".tmp"]
    assert leftovers == [], f"temporary files left next to the output: {leftovers}"
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto, full_check=True)
    # The same graph as the in-memory result (value_info and metadata may be re-serialised).
    mem = result.model
    assert [n.SerializeToString() for n in proto.graph.node] == \
        [n.SerializeToString() for n in mem.graph.node]
    assert sorted(t.SerializeToString() for t in proto.graph.initializer) == \
        sorted(t.SerializeToString() for t in mem.graph.initializer)
    assert io_dims(proto) == io_dims(mem)
    # It runs at batch/sequence sizes never seen before, with the dense model's output shape.
    for batch, seq in ((1, 7), (5, 33)):
        x = tiny_feeds(batch, seq, seed=batch + seq)
        got, dense = run(dst, x), run(src, x)
        assert [g.shape for g in got] == [d.shape for d in dense]
        assert np.all(np.isfinite(got[0]))
        assert np.abs(got[0] - dense[0]).max() > 1e-4, "pruning should change the output"


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_dynamic_axes_stay_symbolic(pruned, form):
    src, _, dst, _, _ = pruned[form]
    before, after = io_dims(onnx.load(str(src))), io_dims(onnx.load(str(dst)))
    assert after == before
    for name, dims in after[:3]:
        assert all(isinstance(d, str) and d for d in dims), f"{name}: {dims}"


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_report_fields_are_populated(pruned, form):
    src, _, dst, result, _ = pruned[form]
    r = result.report
    assert r.input_path == str(src) and r.output_path == str(dst)
    assert 0 < r.macs_after < r.macs_before
    assert 0 < r.params_after < r.params_before
    assert r.size_before == src.stat().st_size and r.size_after == dst.stat().st_size
    assert r.size_after < r.size_before

    assert [layer["block"] for layer in r.layers] == ["layer0.attention", "layer0.mlp",
                                                      "layer1.attention", "layer1.mlp"]
    for layer in r.layers:
        assert layer["unit"] == ("heads" if layer["kind"] == "attention" else "neurons")
        assert layer["units_before"] == (4 if layer["kind"] == "attention" else 48)
        assert 1 <= layer["units_after"] <= layer["units_before"]
        assert layer["units_after"] == len(result.selection.keep[layer["block"]])
    assert sum(layer["units_after"] for layer in r.layers) < sum(
        layer["units_before"] for layer in r.layers)

    if form[1] == "classifier":
        assert set(r.fidelity) == {"kl_to_dense", "top1_agreement"}
        assert r.fidelity["kl_to_dense"] >= 0 and 0 <= r.fidelity["top1_agreement"] <= 1
    else:
        assert set(r.fidelity) == {"cosine_to_dense"}
        assert -1 <= r.fidelity["cosine_to_dense"] <= 1
    # 8 held-out samples: fidelity is measured on them (no note about that), and the refit (asked
    # for by the fixture) is checked on them; the onnxsim decision is always noted
    assert not any("measured on the scoring set" in n for n in r.notes)
    assert sum(n.startswith("refit ") for n in r.notes) == 1
    assert sum(n.startswith("onnxsim ") for n in r.notes) == 1

    assert set(r.stage_seconds) == STAGES
    assert all(t >= 0 for t in r.stage_seconds.values())
    assert list(r.latency) == ["cpu b1 s16"]
    entry = r.latency["cpu b1 s16"]
    assert entry["before_ms"] > 0 and entry["after_ms"] > 0
    assert entry["speedup"] == pytest.approx(entry["before_ms"] / entry["after_ms"])
    assert r.declined == []
    d = r.to_dict()
    assert d["flops_achieved"] == r.flops_achieved and d["verify"]["passed"] is True


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_input_file_is_unchanged(pruned, form):
    src, before, _, _, _ = pruned[form]
    assert sha256(src) == before


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_scores_cover_every_block_and_keep_sets_follow_them(pruned, form):
    _, _, _, result, _ = pruned[form]
    for b in result.structure.blocks:
        imp = result.scores.importance[b.name]
        keep = result.selection.keep[b.name]
        assert imp.shape == (b.n_units,)
        dropped = np.delete(imp, keep)
        if dropped.size:
            assert imp[keep].min() >= dropped.max()


def test_refuses_to_overwrite_the_input_and_bad_budgets(tiny_exports, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny_exports[FORMS[0]].read_bytes())
    before = sha256(src)
    feeds = tiny_feeds(4, 8)
    with pytest.raises(OptinError, match="output path is the input path"):
        prune(src, feeds, output=src)
    with pytest.raises(OptinError, match="output path is the input path"):
        prune(src, feeds, output=tmp_path / "." / "m.onnx")
    for flops in (0.0, 1.5):
        with pytest.raises(OptinError, match=r"--flops must be in \(0, 1\]"):
            prune(src, feeds, flops=flops)
    with pytest.raises(TypeError, match="unknown option"):
        prune(src, feeds, flop=0.5)
    assert sha256(src) == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_prunes_a_model_with_a_fixed_width_rank2_input(tmp_path):
    """A residual MLP on [batch, features] inputs: analysable, so it must be prunable too."""
    rng = np.random.default_rng(0)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    arr = onnx.numpy_helper.from_array
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
         onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
         onnx.helper.make_node("Gemm", ["r", "W2", "b2"], ["o"], name="fc2"),
         onnx.helper.make_node("Add", ["o", "x"], ["y"], name="residual")],
        "mlp", [x], [y],
        [arr(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
         arr(rng.standard_normal(16).astype(np.float32), "b1"),
         arr(rng.standard_normal((16, 8)).astype(np.float32), "W2"),
         arr(rng.standard_normal(8).astype(np.float32), "b2")])
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    from optin_onnx.pipeline import analyze
    _, s = analyze(path)  # without calibration data the analysis finds the block
    assert [(b.name, b.n_units) for b in s.blocks] == [("layer0.mlp", 16)]

    calib = {"x": rng.standard_normal((40, 8)).astype(np.float32)}
    result = prune(path, calib, flops=0.7, latency_cases=[], samples=32)
    assert result.report.verify["passed"]
    assert result.report.flops_achieved <= 0.7 + 1e-9


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime has no CUDA provider")
def test_cuda_provider_prunes_and_verifies(tiny_exports, tmp_path):
    """--provider cuda runs scoring, verification and latency on the GPU (where one is present)."""
    src = tiny_exports[("torchscript", "classifier", False)]
    feeds = tiny_feeds(24, 12, seed=3)
    r = prune(src, feeds, flops=0.6, samples=16, provider="cuda", latency_cases=[(2, 16)],
              latency_seconds=1, output=tmp_path / "gpu.onnx").report
    assert r.verify["passed"]
    assert "cuda b2 s16" in r.latency
    assert 0.59 <= r.flops_achieved <= 0.6 + 1e-9
