"""tools/competitors.py: onnxsim.pruning as a benchmark competitor, on the tiny BERT exported
with eager attention: onnxsim prunes onnxruntime's fused ``Attention``, and onnxruntime's
transformer optimizer fuses only the eager form (transformers' default SDPA export stays
unfused)."""
from __future__ import annotations

import pytest

from tests.helpers import run, tiny_feeds

competitors = pytest.importorskip("tools.competitors")
pytest.importorskip("onnxsim.pruning")


def test_plain_export_is_declined_with_a_reason(tiny_eager_export, tmp_path):
    with pytest.raises(competitors.CannotPrune, match="^onnxsim cannot prune this graph: "):
        competitors.onnxsim_prune(tiny_eager_export("pool"), tmp_path / "o.onnx", 0.4, fuse="never")


@pytest.mark.parametrize("variant", competitors.VARIANTS)
def test_fused_export_loses_heads_and_runs(tiny_eager_export, tmp_path, variant):
    out = tmp_path / f"{variant}.onnx"
    r = competitors.onnxsim_prune(tiny_eager_export("pool"), out, 0.4, variant, tiny_feeds(8, 16))
    assert r["fused"] and "Attention" in r["fused_ops"]
    assert r["params_after"] < r["params_before"]
    assert 0 < r["linear_macs_ratio"] < 1
    assert {k: v for k, v in r["changed_units"].items() if k.endswith("heads")}  # heads went
    assert r["runs_in_onnxruntime"]
    assert run(out, tiny_feeds(2, 12))[0].shape[0] == 2


def test_bad_arguments(tiny_eager_export, tmp_path):
    with pytest.raises(ValueError):
        competitors.onnxsim_prune(tiny_eager_export("pool"), tmp_path / "o.onnx", 0.4, "movement")
    with pytest.raises(ValueError):
        competitors.onnxsim_prune(tiny_eager_export("pool"), tmp_path / "o.onnx", 0.4, "wanda")


def test_fused_macs_count_the_fused_graph_like_the_export(tiny_eager_export):
    import onnx_ir as ir

    from optin_onnx.flops import total_macs

    raw = tiny_eager_export("pool")
    fused = competitors.ort_fuse(str(raw))
    assert any(n.op_type == "Attention" for n in fused.graph.node)
    for seq in (8, 16):
        assert competitors.fused_macs(fused, seq) == total_macs(ir.load(str(raw)), seq)


@pytest.mark.parametrize("variant", ["magnitude", "wanda"])
def test_sweep_reaches_a_flops_level_within_one_neuron_step(tiny_eager_export, variant):
    import onnx_ir as ir

    from optin_onnx.flops import total_macs

    raw = tiny_eager_export("pool")
    fused = competitors.ort_fuse(str(raw))
    dense = total_macs(ir.load(str(raw)), 16)
    feeds = competitors.feeds_for(fused, tiny_feeds(8, 16), 8)
    got = competitors.prune_to_flops(fused, 0.7, variant,
                                     lambda m: competitors.fused_macs(m, 16) / dense, feeds)
    # One FFN neuron in each of the 2 layers is 2 x 1,024 of 262,144 MACs at 16 tokens.
    assert abs(got["flops_kept"] - 0.7) <= 2048 / 262144
    assert competitors.fused_macs(got["model"], 16) / dense == pytest.approx(got["flops_kept"])
    assert 0 < got["head_sparsity"] < 1 and 0 < got["neuron_sparsity"] < 1
    assert run(got["model"], tiny_feeds(2, 12))[0].shape[0] == 2


def test_heads_only_cannot_go_below_one_head_per_layer(tiny_eager_export):
    import onnx_ir as ir

    from optin_onnx.flops import total_macs

    raw = tiny_eager_export("pool")
    fused = competitors.ort_fuse(str(raw))
    dense = total_macs(ir.load(str(raw)), 16)
    got = competitors.prune_to_flops(fused, 0.3, "heads",
                                     lambda m: competitors.fused_macs(m, 16) / dense)
    units = competitors._units(got["model"])
    assert all(v == 1 for k, v in units.items() if k.endswith("heads"))
    assert got["neuron_sparsity"] == 0 and got["flops_kept"] > 0.5
