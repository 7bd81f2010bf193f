"""tools/competitors.py: onnxsim.pruning as a benchmark competitor, on the tiny BERT."""
from __future__ import annotations

import pytest

from tests.helpers import run, tiny_feeds

competitors = pytest.importorskip("tools.competitors")
pytest.importorskip("onnxsim.pruning")

FORM = ("torchscript", "pool", False)


def test_plain_export_is_declined_with_a_reason(tiny_exports, tmp_path):
    with pytest.raises(competitors.CannotPrune, match="^onnxsim cannot prune this graph: "):
        competitors.onnxsim_prune(tiny_exports[FORM], tmp_path / "o.onnx", 0.4, fuse="never")


@pytest.mark.parametrize("variant", competitors.VARIANTS)
def test_fused_export_loses_heads_and_neurons_and_runs(tiny_exports, tmp_path, variant):
    out = tmp_path / f"{variant}.onnx"
    r = competitors.onnxsim_prune(tiny_exports[FORM], out, 0.4, variant, tiny_feeds(8, 16))
    assert r["fused"] and "Attention" in r["fused_ops"]
    assert r["params_after"] < r["params_before"]
    assert 0 < r["linear_macs_ratio"] < 1
    assert {k: v for k, v in r["changed_units"].items() if k.endswith("heads")}  # heads went
    assert r["runs_in_onnxruntime"]
    assert run(out, tiny_feeds(2, 12))[0].shape[0] == 2


def test_bad_arguments(tiny_exports, tmp_path):
    with pytest.raises(ValueError):
        competitors.onnxsim_prune(tiny_exports[FORM], tmp_path / "o.onnx", 0.4, "movement")
    with pytest.raises(ValueError):
        competitors.onnxsim_prune(tiny_exports[FORM], tmp_path / "o.onnx", 0.4, "wanda")
