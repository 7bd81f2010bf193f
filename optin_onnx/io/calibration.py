"""Calibration files and arrays: bounded reading of an ``.npz`` (from its own headers, before any
array is inflated) and the checks that turn data the model cannot run on into one-line errors."""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Collection, Mapping
from typing import IO

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis.cache import cache_inputs
from optin_onnx.errors import OptinError

#: Default bound on the bytes a calibration file's arrays may take once inflated (--max-calib-gib).
CALIBRATION_LIMIT_BYTES = 4 * 2**30


def graph_input_names(model: ir.Model) -> list[str]:
    """Names of the inputs a caller must feed: graph inputs that are not initializers.

    Older exporters also list every initializer as a graph input (with the initializer as its
    default); those are weights, not data, so they are left out.
    """
    return [value.name for value in model.graph.inputs if not value.is_initializer()]


def load_calibration(
    path: str | os.PathLike,
    input_names: list[str],
    max_bytes: int = CALIBRATION_LIMIT_BYTES,
    optional: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Load calibration samples: an ``.npz`` with one array per graph input, first axis = sample.

    A name in ``optional`` (a decoder's cache inputs, which the caller fills with an empty past)
    may be absent from the file; it is then absent from the result.

    Arrays are returned unchanged (no dtype cast): a mismatch with the model's input types should
    surface as a clear error where the model is run, not be hidden by a silent conversion here.
    Arrays for names that are not graph inputs are ignored, so one file can serve several variants
    of a model.

    Pickles are never loaded, and a small file cannot make the tool inflate gigabytes: the arrays'
    sizes are read from the archive's own headers (the zip's declared sizes and each ``.npy``
    header's shape and dtype) and refused above ``max_bytes`` in all before any array is inflated.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OptinError(f"calibration file {path} does not exist")
    # np.load would try anything that is not a zip as .npy or pickle, and complain about pickles.
    if not zipfile.is_zipfile(path):
        raise OptinError(
            f"calibration file {path} is not an .npz archive (or it is truncated):"
            " write it with np.savez"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            # The names np.load gives the members: "x.npy" is array "x".
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for name in input_names:
                if name not in members and name not in optional:
                    raise OptinError(
                        f"calibration file {path} has no array for graph input '{name}'"
                        f" (it has: {', '.join(members) or 'no arrays'})"
                    )
            present = [name for name in input_names if name in members]
            _check_declared_sizes(archive, {n: members[n] for n in present}, path, max_bytes)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in present}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise OptinError(f"calibration file {path} is corrupt: {exc}") from None
    return check_calibration(arrays, f"calibration file {path}")


def calibration_for(
    model: ir.Model,
    calib: str | os.PathLike | Mapping[str, np.ndarray],
    max_bytes: int = CALIBRATION_LIMIT_BYTES,
) -> dict[str, np.ndarray]:
    """The calibration arrays for ``model``'s inputs, from an ``.npz`` path or a mapping of arrays
    (a dict, or what ``np.load`` returns), checked alike either way, and against the model.

    A decoder's key/value cache inputs (:func:`cache_inputs`) may all be left out: they are then
    filled with the empty past a generation's first step sees (:func:`empty_past`), so a text
    calibration set serves a decoder exported with its cache. Given, they must hold an empty past
    too. Every other input is required.
    """
    names = graph_input_names(model)
    cache = cache_inputs(model)
    if isinstance(calib, Mapping):
        missing = [n for n in names if n not in calib and n not in cache]
        if missing:
            raise OptinError(f"calibration data has no array for graph input '{missing[0]}'")
        source = "calibration data"
        arrays = check_calibration({n: calib[n] for n in names if n in calib}, source)
    elif isinstance(calib, (str, os.PathLike)):
        source = f"calibration file {os.fspath(calib)}"
        arrays = load_calibration(calib, names, max_bytes, optional=cache)
    else:
        raise OptinError(
            f"calibration must be an .npz path or a mapping of arrays, got {type(calib).__name__}"
        )
    filled = [n for n, axis in cache.items()
              if n in arrays and arrays[n].ndim > axis and arrays[n].shape[axis]]
    if filled:
        # Every later run (probe, verify, latency) sets the token inputs' length, and a past
        # of another length would no longer fit the attention mask's.
        raise OptinError(
            f"{source}: key/value cache input '{filled[0]}' holds a past of "
            f"{arrays[filled[0]].shape[cache[filled[0]]]} positions; calibrate on an empty past "
            "(length 0), or leave the cache inputs out and an empty one is used")
    absent = [n for n in cache if n not in arrays]
    if absent:
        if len(absent) < len(cache):
            # A past for some layers only cannot run: every layer's past has the same length.
            raise OptinError(
                f"{source} has arrays for some key/value cache inputs but not '{absent[0]}':"
                " give every cache input or none (none: an empty past)"
            )
        if not arrays:
            raise OptinError(f"{source}: the model takes only cache inputs; give them")
        past = empty_past(model, len(next(iter(arrays.values()))))
        arrays = {n: arrays[n] if n in arrays else past[n] for n in names}
    _check_token_inputs(model, arrays, source)
    return arrays


def empty_past(model: ir.Model, batch: int) -> dict[str, np.ndarray]:
    """An empty past for every cache input of ``model`` (:func:`cache_inputs`), ``batch`` rows.

    Length 0 on the past axis, ``batch`` on axis 0, every other axis its declared static size
    (heads, head dim); a symbolic one cannot be guessed and is refused naming the input and axis.
    """
    inputs = {value.name: value for value in model.graph.inputs}
    past: dict[str, np.ndarray] = {}
    for name, axis in cache_inputs(model).items():
        value = inputs[name]
        dims = []
        for i, dim in enumerate(value.shape):
            if i == axis:
                dims.append(0)
            elif i == 0:
                dims.append(batch)
            elif isinstance(dim, int):
                dims.append(dim)
            else:
                raise OptinError(
                    f"cache input '{name}' has a symbolic axis {i} ({dim}): its size is unknown,"
                    " so an empty past cannot be made; give the past in the calibration file"
                )
        past[name] = np.zeros(dims, dtype=value.dtype.numpy())
    return past


def check_calibration(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse calibration arrays no model run could use, naming ``source``, the array and sample.

    Shared by the ``.npz`` loader and in-memory arrays given to the Python API, so both get the
    same one-line errors. Non-finite values are refused because they pass silently otherwise: a
    NaN input makes every score and the verify difference NaN, and NaN compares as "not worse".
    """
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    for name, array in arrays.items():
        if array.ndim == 0:
            raise OptinError(
                f"{source}: array '{name}' is a scalar; the first axis must index samples"
            )
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise OptinError(f"{source}: arrays have different sample counts ({listing})")
    if any(count == 0 for count in counts.values()):
        raise OptinError(f"{source} has zero samples")
    for name, array in arrays.items():
        if array.dtype.kind in "fc":
            bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            if bad.any():
                raise OptinError(
                    f"{source}: array '{name}' has NaN or Inf values in {int(bad.sum())} of"
                    f" {len(array)} samples (first: sample {int(np.argmax(bad))}):"
                    " calibration data must be finite"
                )
    return arrays


def _check_token_inputs(model: ir.Model, arrays: dict[str, np.ndarray], source: str) -> None:
    """Refuse token arrays the model cannot run on, naming the array and the first bad sample.

    Token samples with no positions, an attention mask that is not 0/1 or masks out a whole sample
    (every softmax over it is 0/0), and token ids outside the embedding table that reads them
    (onnxruntime fails, or a negative id silently wraps to the table's end) would otherwise fail
    deep inside scoring or give meaningless scores.
    """
    for name, array in arrays.items():
        # Token arrays (integers) need positions; a float array may be empty (the empty past a
        # decoder with a key/value cache is calibrated with).
        if array.ndim > 1 and 0 in array.shape[1:] and not np.issubdtype(array.dtype, np.floating):
            raise OptinError(
                f"{source}: array '{name}' has shape {array.shape}: every sample is empty"
            )
    mask = arrays.get("attention_mask")
    if mask is not None:
        flat = mask.reshape(len(mask), -1)
        bad = ~np.isin(flat, (0, 1)).all(axis=1)
        if bad.any():
            raise OptinError(
                f"{source}: array 'attention_mask' holds values other than 0 and 1 (first in"
                f" sample {int(np.argmax(bad))})"
            )
        empty = ~flat.any(axis=1)
        if empty.any():
            raise OptinError(
                f"{source}: array 'attention_mask' is all zeros in {int(empty.sum())} samples"
                f" (first: sample {int(np.argmax(empty))}): every sample needs a real token"
            )
    for name, rows in _embedding_rows(model).items():
        ids = arrays.get(name)
        if ids is None or ids.dtype.kind not in "iu":
            continue
        flat = ids.reshape(len(ids), -1)
        bad = ((flat < 0) | (flat >= rows)).any(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            value = flat[first][(flat[first] < 0) | (flat[first] >= rows)][0]
            raise OptinError(
                f"{source}: array '{name}' has id {value} in sample {first}, outside the"
                f" embedding table it indexes (ids must be in [0, {rows}))"
            )


def _embedding_rows(model: ir.Model) -> dict[str, int]:
    """Graph inputs used directly as ``Gather`` indices into a constant table: name -> rows."""
    rows: dict[str, int] = {}
    for value in model.graph.inputs:
        for node, index in value.uses():
            if node.op_type != "Gather" or index != 1 or node.inputs[0] is None:
                continue
            table = node.inputs[0].const_value
            attr = node.attributes.get("axis")
            axis = attr.value if attr is not None else 0
            if table is None or not table.shape.is_static():
                continue
            if -len(table.shape) <= axis < len(table.shape):
                size = table.shape[axis]
                rows[value.name] = min(rows.get(value.name, size), size)
    return rows


def _check_declared_sizes(
    archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], path: str, max_bytes: int
) -> None:
    """Refuse arrays whose headers declare more than ``max_bytes`` in all, before inflating them.

    Both sizes are bounded because either can lie: the zip entry's uncompressed size caps what
    ``zipfile`` inflates, and the ``.npy`` header's shape and dtype decide what numpy allocates
    before reading. Only the few header bytes of each member are inflated here.
    """
    declared = 0
    needed = 0
    for name, info in members.items():
        declared += info.file_size
        with archive.open(info) as member:
            shape, dtype = _npy_header(member, path, name)
            offset = member.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        needed += nbytes
        if max(declared, needed) > max_bytes:
            raise OptinError(
                f"calibration file {path}: its arrays declare {max(declared, needed)} bytes once"
                f" inflated (array '{name}' has shape {shape}, {dtype}), over the limit of"
                f" {max_bytes} bytes: raise it with --max-calib-gib if the data is genuine"
            )
        if offset + nbytes > info.file_size:
            raise OptinError(
                f"calibration file {path} is corrupt: array '{name}' declares shape {shape}"
                f" ({nbytes} bytes) but its member holds {max(info.file_size - offset, 0)}"
            )


def _npy_header(member: IO[bytes], path: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an ``.npy`` stream declares, read from its header alone."""
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        else:  # 2.0 and 3.0 share the layout; 3.0 only allows UTF-8 in field names
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    except ValueError:
        raise OptinError(
            f"calibration file {path}: member '{name}' is not a numpy array (.npy):"
            " write the file with np.savez"
        ) from None
    if dtype.hasobject:
        raise OptinError(
            f"calibration file {path}: array '{name}' holds Python objects ({dtype});"
            " calibration arrays must be numeric"
        )
    return shape, dtype

