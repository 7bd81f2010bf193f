"""The scoring budget: each block's downstream share of the MACs, the cost of scoring at a neuron
group, and ``--neuron-group auto`` choosing the finest group that fits, stated in the report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from optin_onnx import cli
from optin_onnx.errors import OptinError
from optin_onnx.options import PruneOptions
from optin_onnx.scoring.budget import GROUPS, choose_group, downstream_share, scoring_cost
from optin_onnx.stages.prepare import prepare
from tests.helpers import tiny_feeds


@pytest.fixture(scope="module")
def prepared(tiny_exports):
    path = tiny_exports[("torchscript", "classifier", False)]
    return prepare(path, tiny_feeds(8, 16, seed=1), PruneOptions(samples=6))


def test_downstream_share_is_the_macs_after_each_blocks_consumers(prepared) -> None:
    m, s, macs = prepared.model, prepared.structure, prepared.macs
    share = downstream_share(m, s, macs)
    order = {n.name: i for i, n in enumerate(m.graph)}
    for b in s.blocks:
        (c,) = b.consumers
        # In a chain of layers, the nodes after the consumer (in topological order) that do
        # matrix products are exactly those downstream of it.
        after = sum(v for name, v in macs.nodes.items() if order[name] > order[c.node])
        assert share[b.name] == pytest.approx(after / macs.total)
    # Deeper blocks leave less of the model to run; the last one's suffix has no matrix product
    # but the classifier.
    values = [share[b.name] for b in s.blocks]
    assert values == sorted(values, reverse=True)
    assert 0 < values[0] < 1


def test_cost_counts_heads_one_by_one_and_neurons_per_group(prepared) -> None:
    s = prepared.structure
    share = downstream_share(prepared.model, s, prepared.macs)
    heads = sum(b.n_units * share[b.name] for b in s.blocks if b.kind == "attention")
    for group in (1, 4, 8, 1000):
        neurons = sum(np.ceil(b.n_units / group) * share[b.name]
                      for b in s.blocks if b.kind != "attention")
        assert scoring_cost(s, share, group) == pytest.approx(heads + neurons)
    assert scoring_cost(s, share, 1) > scoring_cost(s, share, 8) > scoring_cost(s, share, 1000)


def test_auto_takes_the_finest_group_within_the_budget(prepared) -> None:
    m, s, macs = prepared.model, prepared.structure, prepared.macs
    share = downstream_share(m, s, macs)
    costs = [scoring_cost(s, share, g) for g in GROUPS]
    # A budget between the costs of the 2nd and 3rd group sizes picks the 3rd.
    budget = (costs[1] + costs[2]) / 2
    got = choose_group(m, s, macs, None, budget)
    assert (got.group, got.auto) == (GROUPS[2], True) and got.cost == pytest.approx(costs[2])
    assert choose_group(m, s, macs, None, costs[0] + 1).group == GROUPS[0]
    # Nothing fits (the heads alone cost more): the coarsest, never an error.
    assert choose_group(m, s, macs, None, 0.0).group == GROUPS[-1]
    asked = choose_group(m, s, macs, 3, 0.0)
    assert (asked.group, asked.auto) == (3, False)
    assert asked.cost == pytest.approx(scoring_cost(s, share, 3))


def test_prune_reports_the_group_it_scored_with(tiny_exports, tmp_path) -> None:
    path = tiny_exports[("torchscript", "classifier", False)]
    np.savez(tmp_path / "cal.npz", **tiny_feeds(8, 16, seed=1))
    for flag, group, auto in ((["--neuron-group", "2"], 2, False), ([], GROUPS[0], True)):
        report = tmp_path / f"r{group}.json"
        rc = cli.main(["prune", str(path), str(tmp_path / f"o{group}.onnx"), "--calib",
                       str(tmp_path / "cal.npz"), "--samples", "6", "--latency", "",
                       "--simplify", "off", "--no-reconstruct", "--quiet", "--report", str(report),
                       *flag])
        assert rc == 0
        got = json.loads(report.read_text())
        assert got["scoring"]["neuron_group"] == group
        assert got["scoring"]["neuron_group_auto"] is auto
        assert got["scoring"]["estimated_dense_forwards"] > 0
        assert any(f"groups of {group}" in n for n in got["notes"])


def test_neuron_group_flag_takes_auto_or_a_positive_count(capsys) -> None:
    parse = cli._parser().parse_args
    base = ["prune", "a.onnx", "b.onnx", "--calib", "c.npz"]
    assert parse(base).neuron_group is None
    assert parse([*base, "--neuron-group", "auto"]).neuron_group is None
    assert parse([*base, "--neuron-group", "16"]).neuron_group == 16
    with pytest.raises(SystemExit):
        parse([*base, "--neuron-group", "many"])
    assert "'auto'" in capsys.readouterr().err
    with pytest.raises(OptinError, match="--neuron-group"):
        PruneOptions(neuron_group=0)
