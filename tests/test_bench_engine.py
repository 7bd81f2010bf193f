"""The benchmark engine (tools/bench/) end to end on a tiny BERT classifier: every method at every
level, rows named by the tool, scores shared between methods, and the text results block."""
from __future__ import annotations

import onnx_ir as ir
import pytest

from tests.helpers import tiny_feeds
from tools.bench.methods import Settings
from tools.bench.metrics import classification
from tools.bench.prepare import prepare
from tools.bench.records import merge_record, write
from tools.bench.results import accuracy_block, accuracy_table
from tools.bench.run import run
from tools.bench.runner import outputs


@pytest.fixture(scope="module")
def tiny(tiny_exports):
    """The tiny TorchScript classifier prepared on 4 calibration samples, and an evaluation of
    6 others against its dense logits."""
    path = tiny_exports[("torchscript", "classifier", False)]
    prep = prepare(path, tiny_feeds(4, 12))
    held_out = tiny_feeds(6, 12, seed=1)
    dense = outputs(ir.to_proto(prep.model), held_out)
    return path, prep, lambda proto: classification(outputs(proto, held_out), dense, None)


def _names(calls: list):
    def name(method: str, lam: float, rounds: bool) -> str:
        calls.append((method, lam, rounds))
        return f"{method} lam {lam:g}" + (" rounds" if rounds else "")
    return name


def test_one_row_per_level_and_lambda_and_optin_scores_shared(tiny) -> None:
    path, prep, evaluate = tiny
    calls: list = []
    settings = Settings(levels=(0.8, 0.6), samples=4, neuron_group=1, lams=(1.0, 10.0))
    rows, seconds = run(prep, path, ["optin", "optin+ls", "magnitude", "random"], settings,
                        evaluate, _names(calls))
    # Lambda reweighs scored methods only; magnitude and random have one row.
    assert list(rows) == ["optin lam 1", "optin lam 10", "optin+ls lam 1", "optin+ls lam 10",
                          "magnitude lam 1", "random lam 1"]
    assert not any(rounds for _, _, rounds in calls)
    for got in rows.values():
        assert [r["level"] for r in got] == [0.8, 0.6]
        assert all(r["flops_kept"] <= r["level"] + 0.02 and r["agreement"] >= 0 for r in got)
    # optin+ls reuses optin's scores: same scoring time, recorded once.
    assert seconds["optin+ls lam 1"] == seconds["optin lam 1"] > 0


def test_rounds_give_every_level_from_one_chain(tiny) -> None:
    path, prep, evaluate = tiny
    calls: list = []
    settings = Settings(levels=(0.8, 0.6), samples=4, neuron_group=1, round_step=0.2)
    rows, _ = run(prep, path, ["optin", "magnitude"], settings, evaluate, _names(calls))
    assert list(rows) == ["optin lam 1 rounds", "magnitude lam 1"]  # rounds: scored methods only
    assert [r["level"] for r in rows["optin lam 1 rounds"]] == [0.8, 0.6]


def test_accuracy_block_and_merge(tmp_path) -> None:
    row = {"level": 0.6, "flops_kept": 0.6, "seconds": 1.0, "accuracy": 0.9, "agreement": 0.95,
           "kl_to_dense": 0.1}
    record = {"model": "m", "kind": "logits", "split": "test", "calibration_texts": 32,
              "eval_texts": 10, "seq_len_for_flops": 16, "dense": {"accuracy": 0.92},
              "methods": {"optin": [row]}, "score_seconds": {"optin": 3.0}, "command": "a"}
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    accuracy_block(record, "bbc", results)
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert "| optin | 3 + 1.0 | 90.0 (-2.00; agr 95, KL 0.100) |" in text
    assert "png" not in text  # one level: a table, no plot
    write(record, tmp_path / "accuracy_bbc.json")
    later = dict(record, methods={"local": [row]}, score_seconds={"local": 2.0}, command="b")
    merged = merge_record(tmp_path / "accuracy_bbc.json", later, ("methods", "score_seconds"))
    assert list(merged["methods"]) == ["optin", "local"] and merged["command"] == "a && b"
    # A rerun at one level replaces that cell of a row and keeps its other levels.
    write(dict(record, methods={"optin": [dict(row, level=0.9), row]}), tmp_path / "two.json")
    again = dict(record, methods={"optin": [dict(row, accuracy=0.5)]}, command="c")
    merged = merge_record(tmp_path / "two.json", again, ("methods", "score_seconds"))
    assert [(c["level"], c["accuracy"]) for c in merged["methods"]["optin"]] == [(0.9, 0.9),
                                                                                (0.6, 0.5)]
    # A row at fewer levels has its cell under its own level's column.
    merged["methods"]["local"], merged["score_seconds"]["local"] = [dict(row, level=0.6)], 2.0
    assert accuracy_table(merged).splitlines()[-1].startswith("| local | 2 + 1.0 |  | 90.0")


def test_flops_per_round_keeps_its_old_spelling_unlisted() -> None:
    from tools.bench.cli import parser

    p = parser("prog", "doc", ("optin",))
    assert p.parse_args(["--flops-per-round", "0.1"]).round_step == 0.1
    assert p.parse_args(["--round-step", "0.2"]).round_step == 0.2
    assert p.parse_args([]).round_step == 0.0
    assert "--round-step" not in p.format_help()
