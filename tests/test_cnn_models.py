"""Reference CNNs and vision data (``models/cnn.py``): the load_digits input and its seeded split,
the natural-image set and its split by source photo, the tiny coverage nets exported by both
exporters (onnxruntime equals torch at batch 1 and 3; the graphs hold the structures the nets
exist to cover), the ccexam digit CNNs, and (slow) EfficientNet-Lite0 with its packaged weights."""
from __future__ import annotations

import itertools
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import cnn, photos

TINY_FORMS = list(itertools.product(cnn.TINY_NETS, cnn.EXPORTERS))


def op_counts(path: str | Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def batch_dim(path: str | Path) -> str:
    """The name of the exported input's first axis ('' when it is a fixed size)."""
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def _quiet_export(fn, *args, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def natural() -> tuple[np.ndarray, list[str]]:
    return photos.natural_images()


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(kind, exporter): path}: each tiny net exported once by each exporter (about 4 s)."""
    root = tmp_path_factory.mktemp("tiny_cnn")
    return {(kind, ex): _quiet_export(cnn.export_tiny_cnn, root / f"{kind}_{ex}.onnx", kind, ex)
            for kind, ex in TINY_FORMS}


# ---------------------------------------------------------------------------------------------
# Digits


def test_load_digits() -> None:
    images, labels = cnn.load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert images.min() == 0 and images.max() == 16


@pytest.mark.parametrize("name", cnn.DIGIT_MODELS)
def test_digits_input(name: str) -> None:
    spec = cnn.DIGIT_SPECS[name]
    images = cnn.load_digits()[0][:7]
    x = cnn.digits_input(images, name)
    assert x.shape == (7, spec.channels, spec.size, spec.size) and x.dtype == np.float32
    # Undo the normalisation: pixels in [0, 1], background 0 outside the centred box, ink bright
    # (the digits' 16 becomes 1), every channel the same grey.
    raw = x * np.array(spec.std).reshape(1, -1, 1, 1) + np.array(spec.mean).reshape(1, -1, 1, 1)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert np.isclose(raw.max(), 1.0, atol=1e-5)
    lo = (spec.size - spec.box) // 2
    inside = np.zeros((spec.size, spec.size), bool)
    inside[lo:lo + spec.box, lo:lo + spec.box] = True
    assert np.abs(raw[..., ~inside]).max() < 1e-6
    assert np.abs(raw[..., inside]).max() > 0.5
    assert np.allclose(raw, np.repeat(raw[:, :1], spec.channels, axis=1), atol=1e-6)
    assert np.array_equal(x, cnn.digits_input(images, name))


def test_digits_input_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown digit model"):
        cnn.digits_input(np.zeros((1, 8, 8)), "emnist")


def test_digits_splits() -> None:
    split = cnn.digits_splits()
    calib, test = set(split["calib"].tolist()), set(split["test"].tolist())
    assert len(split["calib"]) == len(calib) == 64 and len(split["test"]) == len(test) == 1733
    assert not calib & test and calib | test == set(range(1797))
    again = cnn.digits_splits()
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["calib"], cnn.digits_splits(seed=1)["calib"])
    assert len(cnn.digits_splits(n_calib=100)["calib"]) == 100

    images, labels = cnn.load_digits()
    data = cnn.digits_data("usps")
    x, y = data["calib"]
    assert x.shape == (64, 1, 16, 16) and np.array_equal(y, labels[split["calib"]])
    assert np.array_equal(x, cnn.digits_input(images[split["calib"]], "usps"))
    assert len(data["test"][1]) == 1733


@pytest.mark.parametrize("name", cnn.DIGIT_MODELS)
def test_digit_cnn_export_classifies_digits(name: str, tmp_path: Path) -> None:
    """The export computes what the ccexam net computes, with a dynamic batch, and classifies the
    held-out digits well above chance (0.83 for each net: see ``cnn.DIGIT_SPECS``)."""
    path = _quiet_export(cnn.export_digit_cnn, tmp_path / f"{name}.onnx", name)
    assert batch_dim(path) == "batch"
    x, y = cnn.digits_data(name)["test"]
    ours, ref = cnn.onnx_logits(path, x), cnn.torch_logits(cnn.digit_cnn(name), x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert cnn.accuracy(ours, y) > 0.8


def test_digit_cnn_dynamo_keeps_flatten_as_reshape(tmp_path: Path) -> None:
    ts = _quiet_export(cnn.export_digit_cnn, tmp_path / "ts.onnx", "mnist")
    dyn = _quiet_export(cnn.export_digit_cnn, tmp_path / "dyn.onnx", "mnist", "dynamo")
    assert op_counts(ts) == Counter(Conv=2, Relu=3, MaxPool=2, Flatten=1, Gemm=2)
    assert op_counts(dyn) == Counter(Conv=2, Relu=3, MaxPool=2, Reshape=1, Gemm=2)
    x = cnn.digits_data("mnist")["calib"][0]
    np.testing.assert_allclose(cnn.onnx_logits(dyn, x), cnn.onnx_logits(ts, x), atol=1e-4)


def test_digits_cnn_is_cached(tmp_path: Path) -> None:
    path = _quiet_export(cnn.digits_cnn, "mnist", cache=str(tmp_path))
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cnn.digits_cnn("mnist", cache=str(tmp_path)) == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# Natural images


def test_natural_images(natural) -> None:
    images, sources = natural
    assert images.dtype == np.uint8 and images.shape[1:] == (224, 224, 3)
    assert 300 <= len(images) == len(sources)
    assert set(sources) == set(photos.NATURAL_SOURCES)
    assert len({img.tobytes() for img in images}) == len(images)  # no view twice
    # Views come in mirror pairs.
    assert np.array_equal(images[1], images[0][:, ::-1])
    assert images.std() > 30  # photos, not blank frames


def test_natural_splits_are_disjoint_by_source(natural) -> None:
    _, sources = natural
    split = photos.natural_splits(sources)
    calib, ev = split["calib"], split["eval"]
    assert sorted(np.concatenate([calib, ev]).tolist()) == list(range(len(sources)))
    calib_src = {sources[i] for i in calib}
    eval_src = {sources[i] for i in ev}
    assert len(calib_src) == photos.NATURAL_N_CALIB_SOURCES and not calib_src & eval_src
    assert calib_src | eval_src == set(photos.NATURAL_SOURCES)
    assert all(np.array_equal(split[k], photos.natural_splits(sources)[k]) for k in split)
    assert any({sources[i] for i in photos.natural_splits(sources, seed=s)["calib"]} != calib_src
               for s in range(1, 4))
    for bad in (0, len(photos.NATURAL_SOURCES)):
        with pytest.raises(ValueError, match="n_calib_sources"):
            photos.natural_splits(sources, n_calib_sources=bad)


def test_efficientnet_input() -> None:
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[1, ..., 0] = 255
    x = cnn.efficientnet_input(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    assert np.allclose(x[0], -127 / 128)
    assert np.allclose(x[1, 0], 1.0) and np.allclose(x[1, 1:], -127 / 128)


# ---------------------------------------------------------------------------------------------
# Tiny coverage nets


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", TINY_FORMS, ids=lambda f: "-".join(f))
def test_tiny_export_matches_torch(tiny_exports, form, batch: int) -> None:
    kind, _ = form
    path = tiny_exports[form]
    assert batch_dim(path) == "batch"
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    max_diff, agree = cnn.compare(cnn.tiny_cnn(kind), path, x)
    assert max_diff < 1e-4 and agree == 1.0


def test_tiny_resnet_structure(tiny_exports) -> None:
    """Stem + 2 convs per block + 2 downsampling shortcuts = 9 convs (BatchNorm folded into them),
    3 residual Adds, then pooling -> flatten -> Gemm as each exporter writes it."""
    common = Counter(Conv=9, Relu=7, Add=3, Gemm=1)
    assert op_counts(tiny_exports["resnet", "torchscript"]) == common + Counter(
        GlobalAveragePool=1, Flatten=1)
    assert op_counts(tiny_exports["resnet", "dynamo"]) == common + Counter(ReduceMean=1, Reshape=1)


@pytest.mark.parametrize("exporter", cnn.EXPORTERS)
def test_tiny_mobilenet_covers_its_structures(tiny_exports, exporter: str) -> None:
    model = onnx.load(str(tiny_exports["mobilenet", exporter]))
    ops = Counter(n.op_type for n in model.graph.node)
    for op, n in dict(Concat=1, MaxPool=2, Sigmoid=1, Mul=1, Add=1, HardSwish=2, Clip=4,
                      Conv=8).items():
        assert ops[op] == n, (op, ops)
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]
    assert 16 in groups  # the depthwise conv
    # The classifier reads 12 channels x 4 x 4 positions: Flatten mixes channel and space.
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert weights[gemm.input[1]] == (10, 12 * 4 * 4)


def test_tiny_nets_are_seeded() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for kind in cnn.TINY_NETS:
        a = cnn.torch_logits(cnn.tiny_cnn(kind, seed=0), x)
        assert np.array_equal(a, cnn.torch_logits(cnn.tiny_cnn(kind, seed=0), x))
        assert not np.allclose(a, cnn.torch_logits(cnn.tiny_cnn(kind, seed=1), x))
    with pytest.raises(ValueError, match="unknown tiny CNN"):
        cnn.tiny_cnn("vgg")


def test_keep_bn(tmp_path: Path) -> None:
    path = _quiet_export(cnn.export_tiny_cnn, tmp_path / "bn.onnx", "resnet", keep_bn=True)
    assert op_counts(path)["BatchNormalization"] == 9
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert cnn.compare(cnn.tiny_cnn("resnet"), path, x)[0] < 1e-4
    with pytest.raises(ValueError, match="keep_bn"):
        cnn.export_tiny_cnn(tmp_path / "x.onnx", "resnet", "dynamo", keep_bn=True)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (packaged ImageNet weights)

#: A few ImageNet-1k class indices (standard order; the packages ship no class names).
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO, MILITARY_UNIFORM = 281, 282, 285, 967, 652
MISSILE, PROJECTILE, MOPED, MOTOR_SCOOTER = 657, 744, 665, 670


@pytest.mark.slow
def test_efficientnet_lite0(natural, tmp_path: Path) -> None:
    """Both exports equal torch on held-out natural images; the torch net names the shipped
    photos sensibly (so weights and preprocessing are right); TorchScript folds BatchNorm but keeps
    the 'same' paddings as Pad nodes, dynamo folds both into the convs; ``keep_bn`` keeps all 49
    BatchNorms; a dynamic-image export runs at other sizes."""
    images, sources = natural
    module = cnn.efficientnet_lite0()
    first = {s: sources.index(s) for s in photos.NATURAL_SOURCES}
    top1 = dict(zip(first, cnn.torch_logits(
        module, cnn.efficientnet_input(images[list(first.values())])).argmax(1).tolist()))
    assert top1["chelsea"] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert top1["coffee"] == ESPRESSO
    assert top1["grace_hopper"] == MILITARY_UNIFORM
    assert top1["rocket"] in (MISSILE, PROJECTILE)
    assert top1["stereo_motorcycle"] in (MOPED, MOTOR_SCOOTER)

    x = cnn.efficientnet_input(images[photos.natural_splits(sources)["eval"][::20]])
    expected = {
        "torchscript": dict(Conv=49, Clip=33, Add=9, Pad=17, GlobalAveragePool=1, Gemm=1),
        "dynamo": dict(Conv=49, Clip=33, Add=9, Pad=0, ReduceMean=1, Reshape=1, Gemm=1),
    }
    for exporter, ops in expected.items():
        path = _quiet_export(cnn.efficientnet_lite0_onnx, exporter, cache=str(tmp_path))
        assert path == tmp_path / f"efficientnet_lite0_{exporter}.onnx"
        counts = op_counts(path)
        assert {op: counts[op] for op in ops} == ops and counts["BatchNormalization"] == 0
        assert batch_dim(path) == "batch"
        max_diff, agree = cnn.compare(module, path, x)
        assert max_diff < 1e-3 and agree == 1.0

    kept = _quiet_export(cnn.export_efficientnet_lite0, tmp_path / "bn.onnx", keep_bn=True,
                         dynamic_image=True)
    assert op_counts(kept)["BatchNormalization"] == 49
    small = np.ascontiguousarray(x[:2, :, :160, :160])
    max_diff, agree = cnn.compare(module, kept, small)
    assert max_diff < 1e-3 and agree == 1.0
