"""Executors: candidate batches scored in a process pool or on Ray give the serial run's scores,
on the tiny BERT (rank-k scorer) and a tiny ResNet (masked scorer); progress counts every unit;
a missing Ray or a bad setting is one clear error."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from optin_onnx.calibrate import make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.pipeline import analyze
from optin_onnx.scoring.executors import run_tasks, stated_workers
from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
from optin_onnx.scoring.types import ExecutorConfig
from tests.helpers import tiny_feeds

BERT_CFG = ScoreConfig(tokens=40, candidates_per_run=3, neuron_group=4)
CNN_CFG = ScoreConfig(tokens=64, candidates_per_run=2, neuron_group=4)


@pytest.fixture(scope="module")
def cases(tiny_exports, tmp_path_factory) -> dict[str, tuple]:
    """{name: (model, structure, calibration, config, serial scores, units)} for both scorers."""
    from models.cnn import export_tiny_cnn

    cnn = export_tiny_cnn(Path(tmp_path_factory.mktemp("cnn")) / "resnet.onnx", "resnet",
                          "torchscript", keep_bn=False)
    images = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    out = {}
    for name, path, cal, cfg in (
            ("bert", tiny_exports[("dynamo", "classifier", True)],
             make_calibration(tiny_feeds(6, 12, seed=1), chunk_size=4), BERT_CFG),
            ("cnn", cnn, make_calibration({"input": images}, chunk_size=4), CNN_CFG)):
        m, s = analyze(path)
        out[name] = (m, s, cal, cfg, score_fast(m, s, cal, cfg), sum(b.n_units for b in s.blocks))
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with two CPUs, so two worker processes (not Ray's local mode); shut
    down after this module's tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def assert_same_scores(got, want) -> None:
    """Equal to 1e-6 of the largest magnitude (onnxruntime's thread count may differ)."""
    for term in ("importance", "md", "kd"):
        g, w = getattr(got, term), getattr(want, term)
        assert set(g) == set(w)
        top = max(np.abs(v).max() for v in w.values())
        for name in w:
            np.testing.assert_allclose(g[name], w[name], rtol=0, atol=1e-6 * top,
                                       err_msg=f"{term} of {name}")


def score_on(case, executor: ExecutorConfig):
    m, s, cal, cfg, _, _ = case
    done: list[int] = []
    scores = score_fast(m, s, cal, replace(cfg, executor=executor), progress=done.append)
    return scores, sum(done)


@pytest.mark.parametrize("name", ["bert", "cnn"])
def test_process_pool_gives_the_serial_scores(cases, name) -> None:
    scores, done = score_on(cases[name], ExecutorConfig("processes", workers=2))
    assert_same_scores(scores, cases[name][4])
    assert done == cases[name][5], "progress counts every unit once"


@pytest.mark.parametrize("name", ["bert", "cnn"])
def test_ray_cluster_of_two_workers_gives_the_serial_scores(cases, ray_cluster, name) -> None:
    scores, done = score_on(cases[name], ExecutorConfig("ray", workers=2))
    assert_same_scores(scores, cases[name][4])
    assert done == cases[name][5]


def test_missing_ray_is_one_clear_error(cases, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(OptinError, match=r"pip install 'optin-onnx\[distributed\]'"):
        score_on(cases["bert"], ExecutorConfig("ray"))


@pytest.mark.parametrize("config,message", [(ExecutorConfig("threads"), "--executor must be"),
                                            (ExecutorConfig("processes", workers=0),
                                             "--workers must be at least 1")])
def test_bad_executor_settings_are_refused(config, message) -> None:
    with pytest.raises(OptinError, match=message):
        run_tasks(None, [(0, [np.array([0])])], config)


def test_the_report_states_each_pools_default_worker_count() -> None:
    assert stated_workers(ExecutorConfig("local")) is None
    assert stated_workers(ExecutorConfig("processes", 3)) == 3
    assert stated_workers(ExecutorConfig("processes")) == len(os.sched_getaffinity(0))
    assert stated_workers(ExecutorConfig("ray", ray_address="auto")) == "one per cluster CPU"
