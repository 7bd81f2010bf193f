"""Recipes that export tiny random vision transformers (ViT, DeiT, Dinov2) to ONNX.

Like :mod:`models.text_encoders` these build test fixtures: they need torch and transformers,
work offline (seeded random configs, no hub downloads) and export with a dynamic batch axis
(``pixel_values`` [batch, 3, H, W]; the image size is fixed by the position embeddings).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

Exporter = Literal["dynamo", "torchscript"]
Family = Literal["vit", "vit-classifier", "deit-classifier", "dinov2"]

FAMILIES: tuple[str, ...] = ("vit", "vit-classifier", "deit-classifier", "dinov2")


class VisionWrapper(nn.Module):
    """Calls a transformers vision model with ``pixel_values=`` (keyword call: the TorchScript
    tracer breaks on positional calls in transformers 5) and returns one tensor: the logits of a
    classifier, else the last hidden state [B, tokens, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


class DenseDecoderWrapper(VisionWrapper):
    """A backbone with a dense decoder after it, as in segmentation or depth heads: the patch
    tokens (class token dropped) as an [B, hidden, h, w] map, then 1x1 conv -> ReLU -> 1x1 conv
    to ``classes`` maps. The decoder's hidden channels are a conv channel group after the
    transformer's heads and neurons."""

    def __init__(self, model: nn.Module, hidden: int = 16, classes: int = 3, seed: int = 0):
        super().__init__(model)
        torch.manual_seed(seed)
        width = model.config.hidden_size
        self.decoder = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU(),
                                     nn.Conv2d(hidden, classes, 1))
        self.eval()

    def forward(self, pixel_values):
        tokens = super().forward(pixel_values)[:, 1:]
        side = self.model.config.image_size // self.model.config.patch_size
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        return self.decoder(grid)


def _widen(model: nn.Module) -> nn.Module:
    """Randomise biases, LayerNorm parameters and layer scales too (as ``tiny_bert`` does), so
    that masking one unit visibly moves the outputs and the exporters do not share tensors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name.lower() or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
            elif "lambda1" in name or "layer_scale" in name:
                p.copy_(0.5 + torch.rand_like(p))
    return model.eval()


def tiny_vision(family: Family = "vit", image: int = 32, patch: int = 8, heads: int = 4,
                head_dim: int = 8, mlp: int = 48, layers: int = 2, num_labels: int = 5,
                seed: int = 0, init_range: float = 0.3) -> nn.Module:
    """A random ViT / DeiT / Dinov2 small enough for exhaustive tests (eager attention)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(image_size=image, patch_size=patch, num_channels=3,
                  hidden_size=heads * head_dim, num_hidden_layers=layers,
                  num_attention_heads=heads, initializer_range=init_range,
                  attn_implementation="eager")
    if family in ("vit", "vit-classifier"):
        cfg = tf.ViTConfig(intermediate_size=mlp, num_labels=num_labels, **common)
        cls = tf.ViTForImageClassification if family == "vit-classifier" else tf.ViTModel
        model = cls(cfg) if family == "vit-classifier" else cls(cfg, add_pooling_layer=False)
    elif family == "deit-classifier":
        cfg = tf.DeiTConfig(intermediate_size=mlp, num_labels=num_labels, **common)
        model = tf.DeiTForImageClassification(cfg)
    elif family == "dinov2":
        # Dinov2's config takes an integer MLP ratio: its MLP width is hidden * round(mlp / hidden).
        ratio = max(1, round(mlp / (heads * head_dim)))
        cfg = tf.Dinov2Config(mlp_ratio=ratio, layerscale_value=1.0, **common)
        model = tf.Dinov2Model(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    return _widen(model)


def export(module: VisionWrapper, path: str | Path, exporter: Exporter = "torchscript",
           opset: int = 17) -> Path:
    """Export ``module`` with a dynamic batch axis (the image size is the config's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = module.model.config.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, (x,), str(path), input_names=["pixel_values"],
                              output_names=["output"],
                              dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        else:
            shapes = {"pixel_values": {0: torch.export.Dim("batch")}}
            prog = torch.onnx.export(module, (x,), input_names=["pixel_values"],
                                     output_names=["output"], dynamic_shapes=shapes,
                                     opset_version=max(opset, 18), dynamo=True)
            prog.save(str(path))
    return path


def calibration_images(n: int, size: int = 32, seed: int = 0) -> "np.ndarray":  # noqa: F821
    """``n`` calibration images [n, 3, size, size], float32, roughly normalised: scikit-image's
    sample images resized when scikit-image is installed, else smooth random images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = []
    try:
        from skimage import data, transform

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
            img = getattr(data, name)()
            images.append(transform.resize(img, (size, size), anti_aliasing=True).transpose(2, 0, 1))
    except ImportError:
        pass
    while len(images) < n:
        low = rng.random((3, 4, 4))
        images.append(np.kron(low, np.ones((size // 4, size // 4))) +
                      0.1 * rng.standard_normal((3, size, size)))
    arr = np.stack(images[:n]).astype(np.float32)
    return (arr - arr.mean()) / (arr.std() + 1e-6)
