"""Build calibration arrays for an image model from a folder of images.

A vision user has photos, not tensors: this module reads them with Pillow (an optional extra,
imported only here), resizes and normalises them as the usual evaluation transforms do, and lays
them out as the model's one image input declares (NCHW or NHWC, its height and width, float32
or float16), so ``make-calib --images`` needs no preprocessing script of the user's own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from optin_onnx.errors import OptinError, first_line
from optin_onnx.io.calibration import graph_input_names

#: File name endings read as images (case-insensitive); any other file in the folder is skipped.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: torchvision's and most ImageNet-trained models' normalisation, the default for RGB inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Layout = Literal["nchw", "nhwc"]
Resize = Literal["shorter", "stretch"]


@dataclass(frozen=True)
class ImageInput:
    """The model's image input: its name, layout, channel count (1 or 3), (height, width) and
    the numpy dtype the arrays must have."""

    name: str
    layout: Layout
    channels: int
    size: tuple[int, int]
    dtype: np.dtype


def _describe(value: ir.Value) -> str:
    dims = "?" if value.shape is None else "[" + ", ".join(str(d) for d in value.shape) + "]"
    return f"'{value.name}' {dims} {value.dtype.name if value.dtype is not None else '?'}"


def image_input(model: ir.Model, layout: Layout | None = None,
                size: tuple[int, int] | None = None) -> ImageInput:
    """The one image input of ``model``, read from its declaration.

    The image input is the single float graph input of rank 4; a model with another input (a
    mask, a second image) cannot be calibrated from images alone and is refused naming it. The
    layout is NCHW when axis 1 is a static 1 or 3 and axis 3 is not, NHWC the other way round;
    anything else is ambiguous and needs ``layout``. Height and width are the static dims, or
    ``size`` where they are symbolic (a given ``size`` must agree with every static one).
    """
    inputs = {value.name: value for value in model.graph.inputs}
    values = [inputs[name] for name in graph_input_names(model)]
    images = [v for v in values if v.dtype is not None and v.dtype.is_floating_point()
              and v.shape is not None and len(v.shape) == 4]
    if len(images) != 1:
        found = ", ".join(_describe(v) for v in (images or values))
        raise OptinError(f"make-calib --images needs a model with exactly one float input of rank 4"
                         f" (an image batch); this one has {len(images)}: {found}")
    value = images[0]
    others = [v for v in values if v is not value]
    if others:
        raise OptinError(f"the model also takes input {_describe(others[0])}, which cannot be built"
                         f" from images: make-calib --images builds only '{value.name}'")
    shape = list(value.shape)

    def is_channels(dim: Any) -> bool:
        return isinstance(dim, int) and dim in (1, 3)

    if layout is None:
        if is_channels(shape[1]) and not is_channels(shape[3]):
            layout = "nchw"
        elif is_channels(shape[3]) and not is_channels(shape[1]):
            layout = "nhwc"
        else:
            raise OptinError(f"cannot tell the layout of input {_describe(value)} (channels on axis"
                             " 1 or 3?): give --layout nchw or --layout nhwc")
    channel_axis, spatial = (1, (2, 3)) if layout == "nchw" else (3, (1, 2))
    channels = shape[channel_axis]
    if not is_channels(channels):
        raise OptinError(f"input {_describe(value)} has {channels} channels on axis {channel_axis}"
                         f" ({layout.upper()}): images can fill 1 (grayscale) or 3 (RGB)")
    declared = [shape[a] if isinstance(shape[a], int) else None for a in spatial]
    if size is None:
        if None in declared:
            raise OptinError(f"input {_describe(value)} has a symbolic height or width:"
                             " give --size HxW")
        size = (declared[0], declared[1])
    elif any(d is not None and d != s for d, s in zip(declared, size)):
        raise OptinError(f"--size {size[0]}x{size[1]} does not match input {_describe(value)}")
    dtype = {ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}.get(
        value.dtype, np.float32)
    return ImageInput(value.name, layout, channels, size, np.dtype(dtype))


def find_images(folder: str | Path) -> tuple[list[Path], int]:
    """The image files under ``folder``, recursively, sorted by their path relative to it, and
    the number of other files skipped.

    Recursive because image datasets are usually one sub-folder per class (ImageFolder's layout);
    sorted so that ``--samples N`` takes the same N images on every machine.
    """
    root = Path(folder)
    if not root.is_dir():
        raise OptinError(f"image folder {folder} does not exist or is not a folder")
    files = sorted((p for p in root.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise OptinError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}"
                         + (f" ({len(files)} other files)" if files else ""))
    return images, len(files) - len(images)


def _pillow() -> Any:
    """Import Pillow only here: it is an optional extra, and the pruning core never needs it."""
    try:
        from PIL import Image
    except ImportError:
        raise OptinError("building calibration data from images needs Pillow:"
                         " pip install optin-onnx[image]") from None
    return Image


def load_image(path: Path, channels: int, size: tuple[int, int],
               resize: Resize = "shorter") -> np.ndarray:
    """One image as float32 ``[height, width, channels]`` in [0, 1].

    Converted to RGB (or grayscale for a 1-channel input), then resized with bilinear filtering:
    ``shorter`` scales it until it covers ``size`` (the shorter side, for a square input) and
    crops the centre, keeping the aspect ratio as torchvision's evaluation transforms do (without
    their 256-to-224 margin); ``stretch`` resizes to ``size`` directly, as Hugging Face's ViT
    image processors do.
    """
    image_module = _pillow()
    height, width = size
    try:
        with image_module.open(path) as opened:
            image = opened.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        raise OptinError(f"cannot read image {path}: {first_line(exc)}") from None
    bilinear = image_module.Resampling.BILINEAR
    if resize == "stretch":
        image = image.resize((width, height), bilinear)
    else:
        scale = max(height / image.height, width / image.width)
        new_w = max(width, round(image.width * scale))
        new_h = max(height, round(image.height * scale))
        image = image.resize((new_w, new_h), bilinear)
        top, left = round((new_h - height) / 2), round((new_w - width) / 2)
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array.reshape(height, width, channels)


def encode_images(paths: Sequence[Path], spec: ImageInput, mean: Sequence[float],
                  std: Sequence[float], resize: Resize = "shorter") -> np.ndarray:
    """The images at ``paths`` as one array for ``spec``'s input: each loaded with
    :func:`load_image`, normalised per channel as ``(x - mean) / std`` and written in the input's
    layout (NCHW or NHWC) and dtype into one array allocated up front, so a large folder costs
    the result and one image, not several float32 copies of the batch."""
    if len(mean) != spec.channels or len(std) != spec.channels:
        raise OptinError(f"--mean and --std need {spec.channels} value(s) each, one per channel of"
                         f" '{spec.name}' (got {len(mean)} and {len(std)})")
    if any(not s > 0 for s in std):
        raise OptinError(f"--std values must be positive, got {','.join(map(str, std))}")
    height, width = spec.size
    per_image = ((spec.channels, height, width) if spec.layout == "nchw"
                 else (height, width, spec.channels))
    batch = np.empty((len(paths), *per_image), dtype=spec.dtype)
    shift, scale = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for i, path in enumerate(paths):
        image = (load_image(path, spec.channels, spec.size, resize) - shift) / scale
        batch[i] = image.transpose(2, 0, 1) if spec.layout == "nchw" else image
    return batch


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for RGB inputs; none (mean 0, std 1) for grayscale, which has no
    common convention."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * channels, (1.0,) * channels
