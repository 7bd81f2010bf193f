"""Heads of a decoder whose KV cache is a graph input and output (issue 9).

``past.{i}.key/value`` come in, are joined with the new keys/values by a Concat along the past
length, and leave as ``present.{i}.key/value``. Pruning a key/value head shrinks the head axis of
both: the analysis records them as ports of the attention block, the rewrite declares the new
sizes, verify feeds the slim model the kept part of the cache, and the report lists each change.
Anything else that puts a head axis on the interface stays a barrier.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import zoo
from optin_onnx.analysis import pruned_feeds
from optin_onnx.instrument import masked_model, unit_masks
from optin_onnx.pipeline import analyze, as_model, prune
from tests.helpers import run, zoo_exports

LAYERS = 2


@pytest.fixture(scope="module")
def cache_exports(tmp_path_factory):
    """The zoo's cached Llama (GQA: 2 key/value heads of 2 query heads each), per exporter."""
    return zoo_exports(tmp_path_factory.mktemp("cache_exports"), "llama-cache")


def cache_ports(structure) -> dict[str, list[tuple[str, bool, int]]]:
    return {b.name: sorted((p.name, p.output, p.axis) for p in b.ports)
            for b in structure.blocks if b.kind == "attention"}


def test_cache_ports_found(cache_exports):
    zm, path = cache_exports("torchscript")
    _, structure = analyze(path, zm.feeds(4))
    assert cache_ports(structure) == {
        f"layer{i}.attention": sorted([(f"past.{i}.key", False, 1), (f"past.{i}.value", False, 1),
                                       (f"present.{i}.key", True, 1),
                                       (f"present.{i}.value", True, 1)])
        for i in range(LAYERS)}
    # Two units per layer (one per key/value head), never emptied: the cache would keep nothing.
    for b in structure.blocks:
        if b.kind == "attention":
            assert b.n_units == 2 and b.removal is None


@pytest.mark.parametrize("exporter", ["torchscript",
                                      pytest.param("dynamo", marks=pytest.mark.slow)])
def test_cache_heads_pruned_exactly(cache_exports, exporter):
    """Heads cut, the cache's declared head axis shrinks, and with a *non-empty* past (the
    calibration's is empty, as at a generation's first step) the slim model equals the masked
    dense model on every output, the present outputs compared at the kept heads."""
    zm, path = cache_exports(exporter)
    feeds = zm.feeds(8)
    result = prune(path, feeds, flops=0.9, prune="heads", latency_cases=[],
                   samples=6, reconstruct="none")
    assert result.verification.passed
    keep = result.selection.keep
    cut = {b.layer for b in result.structure.blocks
           if b.kind == "attention" and len(keep[b.name]) < b.n_units}
    assert cut
    changes = result.structure.interface(keep)
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in (*result.model.graph.input, *result.model.graph.output)}
    for i in range(LAYERS):
        heads = len(keep[f"layer{i}.attention"])
        for name in (f"past.{i}.key", f"past.{i}.value", f"present.{i}.key",
                     f"present.{i}.value"):
            assert declared[name][1] == heads
            assert len(changes[name].kept) == heads
    reported = {(e["name"], e["kind"], e["after"]) for e in result.report.interface}
    assert all((f"present.{layer}.key", "output", 1) in reported for layer in cut)
    assert any("interface changed" in n for n in result.report.notes)
    # The cache is state, not a result: scored and measured on the hidden states only.
    assert result.report.objective_outputs == ["output"]
    assert set(result.report.outputs_left_out) == {f"present.{i}.{kind}" for i in range(LAYERS)
                                                   for kind in ("key", "value")}

    reference = ir.to_proto(masked_model(as_model(onnx.load(str(path))), result.structure,
                                         unit_masks(result.structure, keep)))
    rng = np.random.default_rng(3)
    check = {k: v[:3] for k, v in zm.feeds(3, seed=1).items()}
    past = 5
    for k in check:
        if k.startswith("past"):
            check[k] = rng.standard_normal((3, 2, past, zoo.HEAD_DIM)).astype(np.float32)
    check["attention_mask"] = np.ones((3, past + check["input_ids"].shape[1]), np.int64)
    want = run(reference, check)
    got = run(result.model, pruned_feeds(check, changes))
    names = [v.name for v in result.model.graph.output]
    for name, w, g in zip(names, want, got):
        w = changes[name].take(w) if name in changes else w
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def _add_output(model: onnx.ModelProto, nodes: list[onnx.NodeProto], name: str) -> None:
    model.graph.node.extend(nodes)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))


def test_past_read_on_head_axis_is_a_barrier(cache_exports, tmp_path):
    """The head count of layer 0's past read by the graph (here into an extra output): that
    cache cannot shrink, so layer 0's heads are declined at the present output; layer 1's are
    not."""
    zm, path = cache_exports("torchscript")
    model = onnx.load(str(path))
    index = onnx.numpy_helper.from_array(np.array(1, np.int64), "head_axis")
    model.graph.initializer.append(index)
    _add_output(model, [onnx.helper.make_node("Shape", ["past.0.key"], ["past_shape"]),
                        onnx.helper.make_node("Gather", ["past_shape", "head_axis"],
                                              ["n_heads"])], "n_heads")
    _, structure = analyze(model, zm.feeds(4))
    ports = cache_ports(structure)
    assert list(ports) == ["layer1.attention"]
    assert {name for name, _, _ in ports["layer1.attention"]} == {
        "past.1.key", "past.1.value", "present.1.key", "present.1.value"}
    assert any("reaches graph output 'present.0.key'" in r
               for d in structure.declined for r in d.reasons)


def test_head_axis_output_that_is_no_cache_is_a_barrier(cache_exports):
    """A graph output carrying the head axis that is not a past joined with new values (here
    layer 1's new values, before the Concat) stays a barrier: only a cache round-trips."""
    zm, path = cache_exports("torchscript")
    model = onnx.load(str(path))
    cat = next(n for n in model.graph.node
               if n.op_type == "Concat" and "present.1.value" in n.output)
    _add_output(model, [onnx.helper.make_node("Identity", [cat.input[1]], ["new_values"])],
                "new_values")
    _, structure = analyze(model, zm.feeds(4))
    assert [b.name for b in structure.blocks if b.kind == "attention"] == ["layer0.attention"]
    assert any("reaches graph output 'new_values'" in r
               for d in structure.declined for r in d.reasons)


def test_calibration_with_a_non_empty_past_is_refused(cache_exports):
    """Every run after calibration sets the token inputs' length; a past of its own length would
    no longer fit the attention mask: one line, naming the input."""
    from optin_onnx.errors import OptinError

    zm, path = cache_exports("torchscript")
    feeds = zm.feeds(4)
    feeds = {k: np.zeros((4, 2, 3, zoo.HEAD_DIM), np.float32) if k.startswith("past") else v
             for k, v in feeds.items()}
    with pytest.raises(OptinError, match="cache input 'past.0.key' holds a past of 3 positions"):
        analyze(path, feeds)


def test_analyze_names_the_cache(cache_exports, tmp_path, capsys):
    """``optin-onnx analyze`` says which cache tensors shrink with which block's heads."""
    from tests.test_cli import call

    zm, path = cache_exports("torchscript")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: v for k, v in zm.feeds(4).items() if not k.startswith("past")})
    code, out, _ = call(["analyze", path, "--calib", calib], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "layer1.attention: KV cache past.1.key, present.1.key, past.1.value, " \
           "present.1.value shrinks with its heads" in text
