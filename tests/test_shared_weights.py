"""One weight applied several times is one group, pruned once (issue 9: ALBERT).

ALBERT runs one layer's weights in every layer. The TorchScript export reaches the one stored
tensor through ``Identity`` nodes; the dynamo export writes a copy per application. Either way
the analysis ties the applications into one block (a source or consumer weight with the same
values), the kept units are the same in every application, and the TorchScript export's slim
model still stores each sliced weight once.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import zoo
from optin_onnx.pipeline import analyze, prune
from optin_onnx.report import count_parameters
from tests.helpers import zoo_exports


@pytest.fixture(scope="module")
def albert(tmp_path_factory):
    """The zoo's ALBERT (one layer applied twice), per exporter."""
    return zoo_exports(tmp_path_factory.mktemp("albert"), "albert")


@pytest.mark.parametrize("exporter", ["torchscript",
                                      pytest.param("dynamo", marks=pytest.mark.slow)])
def test_applications_are_one_block(albert, exporter):
    zm, path = albert(exporter)
    _, structure = analyze(path, zm.feeds(4))
    kinds = [(b.kind, b.n_units) for b in structure.blocks]
    assert kinds == [("attention", zoo.HEADS), ("mlp", zoo.FFN)]
    # Each block is read in both applications (2 layers of the model): a consumer in each.
    assert all(len(b.consumers) == zoo.LAYERS for b in structure.blocks)
    assert all(b.removal is None for b in structure.blocks)


def test_pruned_once_and_still_shared(albert):
    """Verified exactly; every application of a sliced weight reads one stored tensor, so the
    parameters fall with the units kept instead of growing with private copies."""
    zm, path = albert("torchscript")
    result = prune(path, zm.feeds(12), flops=0.6, latency_cases=[], samples=8)
    assert result.verification.passed
    sliced = [t for t in result.model.graph.initializer if "__sliced" in t.name]
    assert sliced
    users: dict[str, int] = {}
    for node in result.model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    identity_fed = {n.input[0] for n in result.model.graph.node if n.op_type == "Identity"}
    # A sliced weight is used by every application (directly or through an Identity).
    assert all(users.get(t.name, 0) >= zoo.LAYERS or t.name in identity_fed
               for t in sliced if t.dims and len(t.dims) == 2)
    dense = onnx.load(str(path))
    assert count_parameters(result.model) < count_parameters(dense)
    keep = result.selection.keep
    attention = next(b for b in result.structure.blocks if b.kind == "attention")
    assert 0 < len(keep[attention.name]) <= attention.n_units


def test_constant_weights_tie_nothing():
    """Two projections whose weights are both all zeros share no parameter by that: a weight
    of one repeated value ties nothing (only a real copy does)."""
    from optin_onnx.analysis.propagate import _digest

    assert _digest(np.zeros((4, 4), np.float32)) is None
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert _digest(a) == _digest(a.copy()) != _digest(a.T)
    assert _digest(a) != _digest(a.astype(np.float64))
