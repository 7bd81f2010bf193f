"""Memory: chunk sizes chosen from ``--max-memory-gib``, a dense cache that cannot fit refused in
one line before any capture, peak memory and the scoring set-up in the report, and the executor
options carried from ``prune`` to the scorer."""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from optin_onnx import cli
from optin_onnx.calibrate import CHUNK_SHARE, GIB, chunking, make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.pipeline import analyze, prune
from optin_onnx.report import render
from optin_onnx.runtime import run_all_values
from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
from tests.helpers import tiny_feeds


@pytest.fixture(scope="module")
def tiny(tiny_exports):
    return tiny_exports[("torchscript", "classifier", False)]


def test_chunks_shrink_to_fit_the_limit_and_stay_as_asked_without_one(tiny) -> None:
    proto = ir.to_proto(analyze(tiny)[0])
    arrays = tiny_feeds(20, 16, seed=2)
    free = chunking(proto, arrays, 16, 4, None)
    assert (free.chunk_size, free.candidates_per_run) == (16, 4)
    # The sample measured is the longest one, at full length: every value of one forward pass.
    longest = int(np.argmax(arrays["attention_mask"].sum(1)))
    values = run_all_values(proto, {k: a[longest:longest + 1] for k, a in arrays.items()})
    assert free.sample_bytes == sum(v.nbytes for v in values.values())
    limit = int(free.sample_bytes * 10 / CHUNK_SHARE)  # room for 10 sample-runs per chunk
    tight = chunking(proto, arrays, 16, 4, limit)
    assert (tight.chunk_size, tight.candidates_per_run) == (2, 4)
    assert tight.chunk_size * tight.candidates_per_run * tight.sample_bytes <= CHUNK_SHARE * limit
    tiniest = chunking(proto, arrays, 16, 4, 1)
    assert (tiniest.chunk_size, tiniest.candidates_per_run) == (1, 1)
    assert "chunks of 1 samples, 1 candidates per run" in tiniest.describe()


def test_without_a_limit_a_run_still_stacks_at_most_the_default(tiny, monkeypatch) -> None:
    """A model with large activations per sample (long sequences, large images) gets smaller
    chunks by default, stated in the report's chunking; small ones keep the requested sizes."""
    from optin_onnx import calibrate

    proto = ir.to_proto(analyze(tiny)[0])
    arrays = tiny_feeds(20, 16, seed=2)
    sample = chunking(proto, arrays, 16, 4, None).sample_bytes
    monkeypatch.setattr(calibrate, "DEFAULT_RUN_BYTES", sample * 10)
    got = chunking(proto, arrays, 16, 4, None)
    assert (got.chunk_size, got.candidates_per_run, got.limit_bytes) == (2, 4, None)
    assert "no memory limit" in got.describe()


def test_a_dense_cache_over_the_limit_is_refused_before_scoring(tiny) -> None:
    m, s = analyze(tiny)
    cal = make_calibration(tiny_feeds(6, 12, seed=1), chunk_size=4)
    with pytest.raises(OptinError, match=r"over --max-memory-gib .*use fewer --samples") as info:
        score_fast(m, s, cal, ScoreConfig(tokens=40, max_memory_bytes=100_000))
    assert "\n" not in str(info.value)
    score_fast(m, s, cal, ScoreConfig(tokens=40, max_memory_bytes=GIB))  # fits: no error


def test_report_states_memory_and_scoring_and_workers_give_the_serial_selection(tiny,
                                                                                tmp_path) -> None:
    calib = tiny_feeds(40, 16, seed=1)
    common = dict(latency_cases=(), simplify="off", max_memory_gib=2.0, neuron_group=4)
    local = prune(tiny, calib, **common)
    pooled = prune(tiny, calib, executor="processes", workers=2, report_path=tmp_path / "r.json",
                   **common)
    assert {k: list(v) for k, v in pooled.selection.keep.items()} == \
           {k: list(v) for k, v in local.selection.keep.items()}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["peak_memory"]["process_gib"] > 0
    assert report["scoring"]["executor"] == "processes" and report["scoring"]["workers"] == 2
    assert report["scoring"]["memory_limit_gib"] == 2.0
    assert report["scoring"]["gram_tokens"].endswith(f"of {int(calib['attention_mask'][:32].sum())} "
                                                     f"real tokens")


def test_cli_refuses_bad_executor_options(tiny, tmp_path, capsys) -> None:
    np.savez(tmp_path / "c.npz", **tiny_feeds(4, 8))
    base = ["prune", str(tiny), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz")]
    for extra, message in ((["--workers", "0"], "--workers must be at least 1"),
                           (["--max-memory-gib", "0"], "--max-memory-gib must be above 0")):
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_report_gives_the_peak_memory_as_each_stage_ended(tiny) -> None:
    got = prune(tiny, tiny_feeds(8, 16, seed=1), samples=6, latency_cases=(), simplify="off",
                reconstruct="none").report
    peaks = got.stage_peak_gib
    assert list(peaks) == list(got.stage_seconds)
    # ru_maxrss is a running maximum: never falls from one stage to the next, and the last is the
    # run's peak as the report states it.
    values = list(peaks.values())
    assert values == sorted(values) and values[0] > 0
    assert values[-1] <= got.peak_memory["process_gib"]
    assert "Peak memory so far" in render(got)


def test_copies_of_the_model_share_its_weights(tiny) -> None:
    """The baseline the report measures, the refit's result and the rewrite's input are copies
    of the graph that point at the same stored tensors (a copy per stage would hold the weights
    once more each), and a shared tensor cannot be written through."""
    from optin_onnx.graph import const_array, copy_model
    from optin_onnx.options import PruneOptions
    from optin_onnx.stages.prepare import prepare

    prep = prepare(tiny, tiny_feeds(8, 16, seed=1), PruneOptions(samples=6))
    model_inits = prep.model.graph.initializers
    shared = [name for name, v in prep.original.graph.initializers.items()
              if name in model_inits and v.const_value is model_inits[name].const_value]
    assert len(shared) == len(model_inits) > 0
    copy = copy_model(prep.model)
    for name, value in copy.graph.initializers.items():
        assert value.const_value is model_inits[name].const_value
        arr = const_array(value)
        if arr.size:
            with pytest.raises(ValueError, match="read-only"):
                arr.reshape(-1)[0] = 1
