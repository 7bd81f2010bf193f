"""Run the dense model once in onnxruntime and keep every intermediate value.

The analysis needs concrete shapes (to map axes through Reshape) and the values of small shape
tensors (to find which Concat piece holds a head count). Symbolic shape inference loses both as soon
as a Reshape target is computed at run time, which is how every exporter writes attention; a probe
run at a small, unusual batch and sequence length gives exact answers.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx import runtime
from optin_onnx.errors import OptinError

#: Probe sizes: small, and unlikely to coincide with any model width.
PROBE_BATCH = 3
PROBE_SEQ = 11

_INT_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
              onnx.TensorProto.BOOL: np.bool_}


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def sequence_inputs(model: ir.Model) -> set[str]:
    """Inputs whose axis 1 is a symbolic sequence axis (token inputs: [batch, sequence])."""
    return {v.name for v in graph_inputs(model)
            if v.shape is not None and len(v.shape) == 2 and not isinstance(v.shape[1], int)}


def image_inputs(model: ir.Model) -> set[str]:
    """Inputs [batch, channels, height, width] whose height and width are symbolic (a model
    exported with a dynamic image size)."""
    return {v.name for v in graph_inputs(model)
            if v.shape is not None and len(v.shape) == 4
            and not isinstance(v.shape[2], int) and not isinstance(v.shape[3], int)}


def grow_images(arrays: dict[str, np.ndarray], names: set[str], pixels: int
                ) -> dict[str, np.ndarray]:
    """Image inputs ``names`` made ``pixels`` taller and wider (reflected borders), others as is."""
    lo, hi = pixels // 2, pixels - pixels // 2
    return {k: np.pad(a, [(0, 0), (0, 0), (lo, hi), (lo, hi)], mode="reflect") if k in names
            else a for k, a in arrays.items()}


def sample_feeds(arrays: dict[str, np.ndarray], batch: int, seq: int | None,
                 seq_names: set[str]) -> dict[str, np.ndarray]:
    """Calibration arrays cycled to ``batch`` samples; token inputs tiled/cut to ``seq``."""
    return {k: resize_sample_axes(a, batch, seq if k in seq_names else None)
            for k, a in arrays.items()}


def dummy_feeds(model: ir.Model, batch: int = PROBE_BATCH, seq: int = PROBE_SEQ,
                like: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs for a probe run. Taken from ``like`` (calibration samples, cut or tiled to
    ``batch`` x ``seq``) when given, else synthesised: zeros for integer inputs (a valid token id)
    except ones for anything named like a mask, Gaussian noise for float inputs. Symbolic axis 0 gets
    ``batch``; other symbolic axes get ``seq``."""
    feeds = {}
    seq_names = sequence_inputs(model)
    for v in graph_inputs(model):
        if like is not None and v.name in like:
            feeds[v.name] = resize_sample_axes(like[v.name], batch,
                                               seq if v.name in seq_names else None)
            continue
        if v.shape is None:
            raise OptinError(f"graph input '{v.name}' has no shape; cannot synthesise a probe input")
        dims = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(v.shape)]
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = np.random.default_rng(0).standard_normal(dims).astype(dtype)
        elif "mask" in v.name.lower():
            feeds[v.name] = np.ones(dims, dtype)
        else:
            feeds[v.name] = np.zeros(dims, dtype)
    return feeds


def resize_sample_axes(arr: np.ndarray, batch: int, seq: int | None) -> np.ndarray:
    """Cycle samples to ``batch`` rows and (with ``seq``) tile/cut axis 1 to ``seq`` positions.

    Tiling repeats real tokens, so an ``attention_mask`` stays a valid mask (padding stays padding).
    """
    reps = -(-batch // arr.shape[0])
    out = np.concatenate([arr] * reps, axis=0)[:batch]
    if seq is not None and out.ndim >= 2 and out.shape[1] != seq:
        reps = -(-seq // out.shape[1])
        out = np.concatenate([out] * reps, axis=1)[:, :seq]
    return np.ascontiguousarray(out)


def probe(model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every value of ``model`` (inputs, initializers used as data, node outputs) on a probe input."""
    proto = ir.to_proto(model)
    feeds = feeds if feeds is not None else dummy_feeds(model)
    values = runtime.run_all_values(proto, feeds)
    values.update(feeds)
    return values


def probe_like(model: ir.Model, like: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """:func:`probe` on the calibration samples ``like`` cut or tiled to the probe sizes; a model
    that cannot run at :data:`PROBE_SEQ` tokens (a length that must be a multiple of a window, a
    position table shorter than that) is probed at the calibration's own length instead. The
    first error is the one raised when neither runs."""
    try:
        return probe(model, dummy_feeds(model, like=like))
    except OptinError as first:
        length = calibration_length(model, like or {})
        if length in (None, PROBE_SEQ):
            raise
        try:
            return probe(model, dummy_feeds(model, seq=length, like=like))
        except OptinError:
            raise first from None


def calibration_length(model: ir.Model, like: dict[str, np.ndarray]) -> int | None:
    """The one length of the calibration's token inputs (axis 1), or None where they have none
    or disagree."""
    lengths = {like[k].shape[1] for k in sequence_inputs(model) & set(like)}
    return lengths.pop() if len(lengths) == 1 else None

