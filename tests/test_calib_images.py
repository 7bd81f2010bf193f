"""Calibration from a folder of images (issue 9): ``make-calib --images DIR --model M OUT.npz``
reads photos (scikit-image's sample PNGs and JPEGs, and synthetic ones whose values are known),
resizes, normalises and lays them out as the model's image input declares, and ``prune`` runs on
the result."""
from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optin_onnx.errors import OptinError
from optin_onnx.imagecalib import IMAGENET_MEAN, IMAGENET_STD, image_input, load_image
from tests.test_cli import call, check_one_error_line

Image = pytest.importorskip("PIL.Image")

#: scikit-image's sample photos used as a user's folder: RGB, grayscale, RGBA, PNG and JPEG.
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "color.png",
          "horse.png", "ihc.png", "moon.png", "rocket.jpg"]
SOLID = (200, 100, 50)


def skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image is not installed")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of the :data:`PHOTOS` (two in a class sub-folder), one solid-colour PNG sorted
    first, and a text file that is not an image."""
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    data = skimage_data()
    for i, name in enumerate(PHOTOS):
        shutil.copy(data / name, (folder / "cats" if i < 2 else folder) / name)
    Image.new("RGB", (60, 40), SOLID).save(folder / "aa_solid.png")
    (folder / "README.txt").write_text("where the photos come from\n")
    return folder


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> Path:
    from models.cnn import export_tiny_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_tiny_cnn(tmp_path_factory.mktemp("cnn") / "resnet.onnx")


def identity_model(inputs: dict[str, tuple[int, list]]) -> ir.Model:
    """A graph returning each named input (element type, dims) unchanged."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs]
    values = [helper.make_tensor_value_info(n, t, dims) for n, (t, dims) in inputs.items()]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, None) for n, (t, _) in inputs.items()]
    proto = helper.make_model(helper.make_graph(nodes, "g", values, outs),
                              opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(proto)


def read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- the model's image input ------------------------------------------------------------------

def test_layout_size_and_dtype_come_from_the_input():
    nchw = image_input(identity_model({"x": (TensorProto.FLOAT, ["n", 3, 24, 32])}))
    assert (nchw.name, nchw.layout, nchw.channels, nchw.size, nchw.dtype) == \
        ("x", "nchw", 3, (24, 32), np.float32)
    nhwc = image_input(identity_model({"img": (TensorProto.FLOAT16, ["n", 24, 32, 1])}))
    assert (nhwc.layout, nhwc.channels, nhwc.size, nhwc.dtype) == ("nhwc", 1, (24, 32), np.float16)
    dynamic = identity_model({"x": (TensorProto.FLOAT, ["n", 3, "h", "w"])})
    assert image_input(dynamic, size=(40, 50)).size == (40, 50)


@pytest.mark.parametrize("inputs, kwargs, message", [
    ({"x": (TensorProto.FLOAT, ["n", 3, 8, 3])}, {}, "give --layout nchw or --layout nhwc"),
    ({"x": (TensorProto.FLOAT, ["n", 3, "h", "w"])}, {}, "symbolic height or width: give --size"),
    ({"x": (TensorProto.FLOAT, ["n", 3, 24, 32])}, {"size": (32, 32)},
     "--size 32x32 does not match"),
    ({"x": (TensorProto.FLOAT, ["n", 4, 8, 8])}, {"layout": "nchw"}, "has 4 channels on axis 1"),
    ({"x": (TensorProto.FLOAT, ["n", 3, 8, 8]), "m": (TensorProto.INT64, ["n", 8])}, {},
     "also takes input 'm' [n, 8] INT64"),
    ({"a": (TensorProto.FLOAT, ["n", 3, 8, 8]), "b": (TensorProto.FLOAT, ["n", 3, 8, 8])}, {},
     "exactly one float input of rank 4"),
    ({"ids": (TensorProto.INT64, ["n", 8])}, {}, "this one has 0: 'ids' [n, 8] INT64"),
])
def test_inputs_images_cannot_fill_are_refused(inputs, kwargs, message):
    with pytest.raises(OptinError) as e:
        image_input(identity_model(inputs), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ambiguous_layout_is_resolved_by_the_flag():
    spec = image_input(identity_model({"x": (TensorProto.FLOAT, ["n", 3, 8, 3])}), layout="nhwc")
    assert (spec.layout, spec.channels, spec.size) == ("nhwc", 3, (3, 8))


# -- reading and resizing -------------------------------------------------------------------------

def test_shorter_side_crop_keeps_the_aspect_ratio_and_stretch_does_not(tmp_path):
    # 64 x 128: red columns 0-39, green 40-87, blue 88-127.
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :40, 0] = pixels[:, 40:88, 1] = pixels[:, 88:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "bands.png")
    crop = load_image(tmp_path / "bands.png", 3, (32, 32), "shorter")
    stretch = load_image(tmp_path / "bands.png", 3, (32, 32), "stretch")
    assert crop.shape == stretch.shape == (32, 32, 3) and crop.dtype == np.float32
    # Halved to 32 x 64, the middle 32 columns kept: column 8 is original column ~49 (green);
    # stretched 4x narrower, column 8 is original column ~34 (red).
    assert np.argmax(crop[16, 8]) == 1 and np.argmax(stretch[16, 8]) == 0
    assert np.argmax(crop[16, 0]) == 0 and np.argmax(crop[16, 31]) == 2
    gray = load_image(tmp_path / "bands.png", 1, (16, 16))
    assert gray.shape == (16, 16, 1) and 0 <= gray.min() <= gray.max() <= 1


# -- make-calib --images --------------------------------------------------------------------------

def test_make_calib_from_photos_for_a_cnn(photos, tiny_cnn, tmp_path, capsys):
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    code, out, err = call(["make-calib", "--images", photos, "--model", tiny_cnn,
                           tmp_path / "calib.npz"], capsys)
    assert code == 0, err
    assert f"read {len(PHOTOS) + 1} images" in out and "(1 non-image files skipped)" in out
    arrays = read(tmp_path / "calib.npz")
    assert list(arrays) == ["input"]
    x = arrays["input"]
    assert x.shape == (len(PHOTOS) + 1, 3, 32, 32) and x.dtype == np.float32
    # The solid image sorts first (sub-folder "cats/" sorts after "aa_solid.png"); its red
    # channel by hand: (200 / 255 - 0.485) / 0.229 = 1.30705.
    assert x[0, 0, 5, 7] == pytest.approx(1.30705, abs=1e-4)
    blue = (50 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    assert x[0, 2, 31, 0] == pytest.approx(blue, abs=1e-5)
    assert not np.allclose(x[1], x[2])
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before
    session = ort.InferenceSession(str(tiny_cnn), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"input": x})[0]).all()

    code, out, err = call(["prune", tiny_cnn, tmp_path / "slim.onnx", "--calib",
                           tmp_path / "calib.npz", "--flops", "0.7", "--samples", "6",
                           "--latency", "", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["passed"] is True and report["macs_after"] < report["macs_before"]


def test_make_calib_for_a_vit_with_flags(photos, tmp_path, capsys):
    zoo = pytest.importorskip("models.zoo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = zoo.export(zoo.ZOO["vit"]("default"), tmp_path / "vit.onnx", "torchscript")
    code, out, err = call(["make-calib", "--images", photos, "--model", vit, tmp_path / "c.npz",
                           "--samples", "3", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                           "--resize", "stretch"], capsys)
    assert code == 0, err
    x = read(tmp_path / "c.npz")["pixel_values"]
    assert x.shape == (3, 3, zoo.IMAGE, zoo.IMAGE)
    assert x[0, 1, 0, 0] == pytest.approx((100 / 255 - 0.5) / 0.5, abs=1e-5)  # solid green 100
    assert x.min() >= -1 and x.max() <= 1
    session = ort.InferenceSession(str(vit), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"pixel_values": x})[0]).all()


def test_make_calib_grayscale_nhwc_float16_without_normalisation(photos, tmp_path, capsys):
    ir.save(identity_model({"gray": (TensorProto.FLOAT16, ["n", 28, 28, 1])}), tmp_path / "m.onnx")
    code, out, err = call(["make-calib", "--images", photos, "--model", tmp_path / "m.onnx",
                           tmp_path / "c.npz", "--samples", "2"], capsys)
    assert code == 0, err
    x = read(tmp_path / "c.npz")["gray"]
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float16
    # Pillow's luma of (200, 100, 50): (200 * 299 + 100 * 587 + 50 * 114) / 1000 = 124.2 -> 124.
    assert float(x[0, 3, 3, 0]) == pytest.approx(124 / 255, abs=1e-3)


def bad_image_case(name: str, d: Path, photos: Path, cnn: Path) -> tuple[list, list[str]]:
    """argv and the substrings its one error line must hold."""
    out = d / "out.npz"
    if name == "empty-folder":
        (d / "empty").mkdir()
        return ["make-calib", "--images", d / "empty", "--model", cnn, out], ["no images", "empty"]
    if name == "no-model":
        return ["make-calib", "--images", photos, out], ["needs --model"]
    if name == "unreadable":
        (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
        return (["make-calib", "--images", photos, "--model", cnn, out],
                ["cannot read image", "broken.jpg"])
    if name == "no-size":
        ir.save(identity_model({"x": (TensorProto.FLOAT, ["n", 3, "h", "w"])}), d / "dyn.onnx")
        return ["make-calib", "--images", photos, "--model", d / "dyn.onnx", out], ["--size HxW"]
    if name == "bad-size":
        return (["make-calib", "--images", photos, "--model", cnn, out, "--size", "32"],
                ["--size takes HxW"])
    if name == "mean-alone":
        return (["make-calib", "--images", photos, "--model", cnn, out, "--mean", "0.5,0.5,0.5"],
                ["--mean and --std together"])
    if name == "mean-count":
        return (["make-calib", "--images", photos, "--model", cnn, out, "--mean", "0.5",
                 "--std", "0.5"], ["3 value(s) each"])
    if name == "image-flag-on-text":
        return (["make-calib", "t.txt", "tok", out, "--resize", "stretch"],
                ["--resize applies to --images"])
    if name == "extra-path":
        return (["make-calib", "--images", photos, "--model", cnn, d / "x", out],
                ["takes one path, OUT.npz, got 2"])
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["empty-folder", "no-model", "unreadable", "no-size", "bad-size",
                                  "mean-alone", "mean-count", "image-flag-on-text", "extra-path"])
def test_bad_image_input_is_one_error_line(name, photos, tiny_cnn, tmp_path, capsys):
    argv, wanted = bad_image_case(name, tmp_path, photos, tiny_cnn)
    code, out, err = call(argv, capsys)
    check_one_error_line(code, out, err, wanted)
    assert not (tmp_path / "out.npz").exists()
