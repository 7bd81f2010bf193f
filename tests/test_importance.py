"""The importance registry: each name gives the criterion it says, configured from one ScoreConfig,
and scores exactly what the scorer behind it scores."""
from __future__ import annotations

import numpy as np
import pytest

from optin_onnx.calibrate import make_calibration
from optin_onnx.errors import OptinError
from optin_onnx.pipeline import METHODS, analyze
from optin_onnx.scoring.baselines import score_magnitude, score_random
from optin_onnx.scoring.importance import (IMPORTANCES, LocalImportance, MagnitudeImportance,
                                           OptinImportance, RandomImportance, make_importance)
from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
from tests.helpers import tiny_feeds

FORM = ("torchscript", "classifier", False)
CFG = ScoreConfig(tokens=40, neuron_group=4, seed=3)


@pytest.fixture(scope="module")
def setup(tiny_exports):
    m, s = analyze(tiny_exports[FORM])
    return m, s, make_calibration(tiny_feeds(6, 12, seed=1), chunk_size=4)


def test_the_registry_is_what_prune_accepts():
    assert METHODS == tuple(IMPORTANCES) == ("optin", "local", "magnitude", "random")


def test_each_name_is_its_criterion_configured_from_the_config():
    assert make_importance("optin", CFG) == OptinImportance(CFG)
    # the name decides the features, whatever the config says
    assert make_importance("optin", ScoreConfig(features="local")).cfg.features == "trajectory"
    assert make_importance("local", CFG) == LocalImportance(
        ScoreConfig(tokens=40, neuron_group=4, seed=3, features="local"))
    assert make_importance("magnitude", CFG) == MagnitudeImportance()
    assert make_importance("random", CFG) == RandomImportance(seed=3)


def test_only_scores_that_depend_on_the_selection_rescore():
    assert {name for name, c in IMPORTANCES.items() if c.rescores} == {"optin", "local"}


def test_unknown_name_is_an_optin_error():
    with pytest.raises(OptinError, match="importance criterion must be one of optin, local"):
        make_importance("wanda", CFG)


@pytest.mark.parametrize("name", METHODS)
def test_a_criterion_scores_what_its_scorer_scores(setup, name):
    m, s, cal = setup
    base = {b.name: list(range(1, b.n_units, 2)) for b in s.blocks}
    want = {
        "optin": lambda: score_fast(m, s, cal, CFG, base=base),
        "local": lambda: score_fast(m, s, cal, ScoreConfig(tokens=40, neuron_group=4, seed=3,
                                                           features="local"), base=base),
        "magnitude": lambda: score_magnitude(m, s),
        "random": lambda: score_random(s, 3),
    }[name]()
    got = make_importance(name, CFG).score(m, s, cal, base=base)
    assert set(got.importance) == set(want.importance)
    for block, value in want.importance.items():
        np.testing.assert_array_equal(got.importance[block], value)
