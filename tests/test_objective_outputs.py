"""Objective outputs (``--objective-output``): which graph outputs the output term compares and
fidelity is measured on. By default every output a prunable block can change (a third-party
embedding export also returns its inputs, often first); with the option, exactly those named.
With one objective output the scores are what they were before there could be several."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx.analysis import Structure, analyze_graph
from optin_onnx.calibrate import make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.options import PruneOptions
from optin_onnx.probe import dummy_feeds, probe
from optin_onnx.scoring.features import (dependent_outputs, objective_outputs, outputs_left_out,
                                         outputs_reached)
from optin_onnx.scoring.masked import score_masked
from optin_onnx.scoring.trajectory import score_fast, score_naive
from optin_onnx.scoring.types import ScoreConfig, Scores
from tests.helpers import run
from tests.test_cli import call
from tests.test_options import parse

D, H = 8, 16
OUTPUTS = ["x_out", "last_hidden_state", "pooled"]


def embedding_export(pooled: bool = True, hidden: bool = False) -> onnx.ModelProto:
    """x [b, s, 8] -> two residual MLP layers (16 neurons each) -> last_hidden_state, then the
    mean over tokens -> MatMul -> Tanh -> pooled; ``x_out = Identity(x)`` comes first, as in
    third-party sentence-embedding exports. ``pooled=False``: no pooled output; ``hidden``: the
    residual stream between the layers is output ``h1`` too, last."""
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, int]) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [helper.make_node("Identity", ["x"], ["x_out"], name="pass"),
             helper.make_node("MatMul", ["x", "W1"], ["a1"], name="fc1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["m1"], name="fc2"),
             helper.make_node("Add", ["x", "m1"], ["h1"], name="res1"),
             helper.make_node("MatMul", ["h1", "W3"], ["a2"], name="fc3"),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "W4"], ["m2"], name="fc4"),
             helper.make_node("Add", ["h1", "m2"], ["last_hidden_state"], name="res2"),
             helper.make_node("ReduceMean", ["last_hidden_state"], ["mean"], axes=[1],
                              keepdims=0, name="pool"),
             helper.make_node("MatMul", ["mean", "Wp"], ["pm"], name="fcp"),
             helper.make_node("Tanh", ["pm"], ["pooled"], name="tanh")]
    inits = [w("W1", (D, H)), w("W2", (H, D)), w("W3", (D, H)), w("W4", (H, D)), w("Wp", (D, D))]
    outs = [helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["b", "s", D]),
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", D])]
    if pooled:
        outs.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b", D]))
    else:
        nodes = nodes[:-3]
    if hidden:
        outs.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["b", "s", D]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])], outs,
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration(n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 5, D)).astype(np.float32)


def analysed(pooled: bool = True, hidden: bool = False) -> tuple[ir.Model, Structure]:
    m = ir.from_proto(embedding_export(pooled, hidden))
    return m, analyze_graph(m, probe(m, dummy_feeds(m, like={"x": calibration()})))


def scores(pooled: bool, objectives: tuple[str, ...] | None, scorer=score_fast,
           hidden: bool = False) -> Scores:
    m, s = analysed(pooled, hidden)
    return scorer(m, s, make_calibration({"x": calibration()}, 4),
                  ScoreConfig(lam=0.5, objective_outputs=objectives))


# -- which outputs ---------------------------------------------------------------------------------

def test_default_objectives_are_every_output_a_block_reaches():
    m, s = analysed()
    assert [b.name for b in s.blocks] == ["layer0.mlp", "layer1.mlp"]
    assert dependent_outputs(m, s) == objective_outputs(m, s) == ["last_hidden_state", "pooled"]
    assert outputs_left_out(m, s, ["last_hidden_state", "pooled"]) == {
        "x_out": "no prunable block reaches it"}
    assert outputs_left_out(m, s, ["pooled"]) == {
        "x_out": "no prunable block reaches it",
        "last_hidden_state": "not chosen by --objective-output"}


def test_requested_objectives_are_exactly_those_in_their_order():
    m, s = analysed()
    assert objective_outputs(m, s, ["pooled"]) == ["pooled"]
    assert objective_outputs(m, s, ["pooled", "last_hidden_state", "pooled"]) == [
        "pooled", "last_hidden_state"]


@pytest.mark.parametrize("requested, wanted", [
    (["nope"], "--objective-output: the model has no output 'nope' (its outputs: x_out, "
               "last_hidden_state, pooled)"),
    (["pooled", "x_out"], "--objective-output: output 'x_out' does not depend on any prunable "
                          "block, so pruning cannot change it"),
])
def test_bad_requested_objective_is_one_line(requested, wanted):
    m, s = analysed()
    with pytest.raises(OptinError) as err:
        objective_outputs(m, s, requested)
    assert str(err.value) == wanted


def test_excluded_outputs_are_never_objectives():
    """The hook a KV-cache decoder's ``present.*`` outputs go through."""
    m, s = analysed()
    assert objective_outputs(m, s, exclude={"pooled"}) == ["last_hidden_state"]
    with pytest.raises(OptinError, match="output 'pooled' cannot be an objective"):
        objective_outputs(m, s, ["pooled"], exclude={"pooled"})
    with pytest.raises(OptinError, match=r"nothing to score against \(excluded: "
                                         r"last_hidden_state, pooled\)"):
        objective_outputs(m, s, exclude={"pooled", "last_hidden_state"})
    assert outputs_left_out(m, s, ["last_hidden_state"], exclude={"pooled"})["pooled"] == \
        "a KV cache output (its shape follows the kept heads)"


# -- the output term -------------------------------------------------------------------------------

#: score_fast importances (lam 0.5) with last_hidden_state the only objective, computed before
#: objectives could be several (then the first output a block reaches was the objective).
PINNED = {
    "layer0.mlp": [0.26219356911371383, 2.5826746671440524, 1.5201367099421783,
                   1.3024566451826152, 0.3799951335036996, 0.3754927048975324,
                   0.20527672696572918, 0.9746131989581142, 0.6361936175899371,
                   1.181576484115928, 0.9433831562087223, 3.9940777610599034,
                   3.0826966500852047, 2.287114518525943, 1.4679803067198907,
                   0.21459885326060613],
    "layer1.mlp": [0.7903421860947444, 0.35707596388895013, 1.2552874062260022,
                   5.014227437582102, 1.3472115528806423, 0.4059327753345692,
                   0.4704127708673525, 0.24077039271204387, 1.1825640810143105,
                   0.4681019747268566, 2.6369770326046966, 0.6590711163831764,
                   3.1473432333311164, 2.917699447633466, 1.0863143212773767,
                   4.610207604168823],
}


def test_scores_with_one_objective_output_are_unchanged():
    alone = scores(False, None)  # last_hidden_state is the model's only dependent output
    chosen = scores(True, ("last_hidden_state",))
    for name, pinned in PINNED.items():
        # The same model up to an output nobody compares: the same numbers, to the bit.
        np.testing.assert_array_equal(chosen.importance[name], alone.importance[name])
        # And what they were before (rtol for another machine's float rounding only).
        np.testing.assert_allclose(alone.importance[name], pinned, rtol=1e-5)
        assert alone.kd[name].shape == (16, 1)


def test_each_output_term_is_computed_as_alone_then_averaged_over_outputs():
    both = scores(True, None)
    lhs, pooled = scores(True, ("last_hidden_state",)), scores(True, ("pooled",))
    md = np.concatenate([both.md[b] for b in PINNED])
    kd = np.concatenate([both.kd[b] for b in PINNED])
    assert kd.shape == (32, 2)
    for b in PINNED:
        np.testing.assert_allclose(both.md[b], lhs.md[b], rtol=1e-6)
        np.testing.assert_allclose(both.kd[b][:, 0], lhs.kd[b][:, 0], rtol=1e-6)
        np.testing.assert_allclose(both.kd[b][:, 1], pooled.kd[b][:, 0], rtol=1e-6)
        want = both.md[b] / md.mean() + 0.5 * (both.kd[b][:, 0] / kd[:, 0].mean()
                                                + both.kd[b][:, 1] / kd[:, 1].mean()) / 2
        np.testing.assert_allclose(both.importance[b], want, rtol=1e-12)
    # Both outputs count: the ranking differs from either alone.
    order = [np.argsort(np.concatenate([r.importance[b] for b in PINNED]))
             for r in (both, lhs, pooled)]
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[0], order[2])


def test_fast_scores_of_two_outputs_agree_with_the_reference():
    fast, naive = scores(True, None), scores(True, None, score_naive)
    for b in PINNED:
        np.testing.assert_allclose(fast.kd[b], naive.kd[b], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(fast.importance[b], naive.importance[b], rtol=1e-4)


def test_an_output_a_block_cannot_change_adds_nothing_to_its_scores():
    """Layer 1's neurons cannot change ``h1`` (computed before them): its term is zero for them,
    and the suffix runs of layer 1 (rank-k and masked) never ask for it."""
    m, s = analysed(hidden=True)
    assert outputs_reached(m, s) == {"layer0.mlp": ["last_hidden_state", "pooled", "h1"],
                                     "layer1.mlp": ["last_hidden_state", "pooled"]}
    fast = scores(True, None, hidden=True)
    assert fast.kd["layer1.mlp"].shape == (16, 3)
    assert np.all(fast.kd["layer1.mlp"][:, 2] == 0) and np.all(fast.kd["layer0.mlp"][:, 2] > 0)
    for other in (scores(True, None, score_naive, hidden=True),
                  scores(True, None, score_masked, hidden=True)):
        for b in PINNED:
            np.testing.assert_allclose(fast.kd[b], other.kd[b], rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(fast.importance[b], other.importance[b], rtol=1e-4)


def test_no_output_outweighs_another_by_its_scale():
    rng = np.random.default_rng(0)
    md = {"a": rng.random(5), "b": rng.random(3)}
    kd = {"a": rng.random((5, 2)), "b": rng.random((3, 2))}
    loud = {k: v * [1.0, 1e4] for k, v in kd.items()}
    quiet, scaled = Scores(md=md, kd=kd).finalize(2.0), Scores(md=md, kd=loud).finalize(2.0)
    for k in md:
        np.testing.assert_allclose(scaled.importance[k], quiet.importance[k], rtol=1e-12)


# -- the option, the pipeline and the report -------------------------------------------------------

def test_option_parses_names_and_refuses_what_is_not_a_list_of_names():
    assert parse("--objective-output", "pooled, last_hidden_state").objective_outputs == (
        "pooled", "last_hidden_state")
    assert PruneOptions(objective_outputs=["pooled"]).objective_outputs == ("pooled",)
    for bad in ("pooled", [], [""], [3]):
        with pytest.raises(OptinError, match="--objective-output must be a non-empty list of "
                                             "output names"):
            PruneOptions(objective_outputs=bad)


@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the report at 80 columns otherwise


def prune_cli(tmp_path: Path, capsys, *extra: str) -> tuple[int, str, str, dict]:
    onnx.save(embedding_export(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=calibration(12))
    code, out, err = call(["prune", tmp_path / "m.onnx", tmp_path / "o.onnx", "--calib",
                           tmp_path / "c.npz", "--samples", "8", "--flops", "0.7", "--latency",
                           "", "--simplify", "off", "--quiet", "--report", tmp_path / "r.json",
                           *extra], capsys)
    report = json.loads((tmp_path / "r.json").read_text()) if code == 0 else {}
    return code, out, err, report


def test_default_prune_scores_and_reports_every_dependent_output(tmp_path, capsys, wide_console):
    code, out, err, report = prune_cli(tmp_path, capsys)
    assert code == 0, err
    assert report["objective_outputs"] == ["last_hidden_state", "pooled"]
    assert report["outputs_left_out"] == {"x_out": "no prunable block reaches it"}
    by_output = report["fidelity_by_output"]
    assert report["fidelity"] == by_output["last_hidden_state"]
    # Fidelity on the 4 held-out samples, recomputed with onnxruntime.
    held = {"x": calibration(12)[8:]}
    dense, slim = run(tmp_path / "m.onnx", held), run(tmp_path / "o.onnx", held)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1)
                             / np.linalg.norm(b, axis=1)))

    assert by_output["last_hidden_state"]["token_cosine_to_dense"] == pytest.approx(
        cosine(dense[1], slim[1]), rel=1e-5)
    assert by_output["pooled"]["cosine_to_dense"] == pytest.approx(cosine(dense[2], slim[2]),
                                                                   rel=1e-5)
    assert "Scored against: last_hidden_state, pooled; left out: x_out (no prunable block " \
           "reaches it)" in out
    assert "pooled" in out.split("Fidelity")[1] and "cosine_to_dense" in out


def test_objective_output_option_picks_one(tmp_path, capsys):
    code, out, err, report = prune_cli(tmp_path, capsys, "--objective-output", "pooled")
    assert code == 0, err
    assert report["objective_outputs"] == ["pooled"]
    assert list(report["fidelity_by_output"]) == ["pooled"]
    assert set(report["fidelity"]) == {"cosine_to_dense"}
    assert report["outputs_left_out"]["last_hidden_state"] == "not chosen by --objective-output"


@pytest.mark.parametrize("name, wanted", [
    ("nope", "the model has no output 'nope' (its outputs: x_out, last_hidden_state, pooled)"),
    ("x_out", "output 'x_out' does not depend on any prunable block"),
])
def test_bad_objective_output_is_one_line_and_exit_2(name, wanted, tmp_path, capsys):
    code, out, err, _ = prune_cli(tmp_path, capsys, "--objective-output", name)
    assert code == 2
    assert err.startswith("optin-onnx: error: --objective-output: ") and wanted in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "r.json").exists()
