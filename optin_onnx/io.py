"""Loading, validating and saving models and calibration data.

Everything that touches the user's files goes through here, so that each bad input is reported as
one :class:`~optin_onnx.errors.OptinError` line naming the file and the problem instead of a
protobuf or numpy traceback from deep inside a pruning stage, and so that writing an output can
never damage the input it was derived from.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from optin_onnx.errors import OptinError, first_line
from optin_onnx.guard import same_file

# A serialized ModelProto cannot exceed 2 GiB (protobuf's limit). Above this many bytes of
# initializers the weights go to an external data file, leaving headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# Ops that only appear in quantised graphs. Pruning reasons about fp32 weights and activations, so
# it cannot score or slice these; any op named QLinear* is caught by prefix as well.
_QUANTISED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QAttention",
        "QGemm",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "GatherBlockQuantized",
    }
)
# Low-precision integer weights feeding these ops mean weight-only quantisation.
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_LOW_BIT_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
)

#: Default bound on the bytes a calibration file's arrays may take once inflated (--max-calib-gib).
CALIBRATION_LIMIT_BYTES = 4 * 2**30

# Key of ir.Model.meta (kept in memory, never serialised) under which load_model records its files.
_FILES_READ = "optin_onnx.files_read"

_QUANTISED_HINT = "quantised models are not supported: prune the fp32 model, then quantise"
_HALF_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_HALF_HINT = (
    "float16/bfloat16 models are not supported: prune the fp32 model, then convert the result"
    " (e.g. onnxconverter_common.float16.convert_float_to_float16)"
)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model and reject anything the pruner cannot work on.

    ``ir.load`` maps external data lazily, so models over 2 GB load without reading their weights.
    The checks here are the cheap ones that turn a later, confusing failure into a clear message:
    the file parses and is complete, the graph has nodes and inputs, it is neither quantised nor
    half precision, every initializer stored in the file holds the data its shape needs, and every
    external data file lies inside the model's folder, exists and is long enough (nothing is read
    from a file before its location is checked). ``onnx.checker`` is deliberately not run: it is
    too slow on large models, and onnxruntime validates the graph when a session is built.
    """
    path = os.fspath(path)
    # Everything reads from the absolute path, so that external data is resolved against (and
    # contained in) the model's folder even when the path is a bare file name.
    source = os.path.abspath(path)
    if not os.path.exists(path):
        raise OptinError(f"model file {path} does not exist")
    if os.path.isdir(path):
        raise OptinError(f"model path {path} is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise OptinError(f"model file {path} is empty")
    try:
        model = ir.load(source)
    except DecodeError:
        raise OptinError(_diagnose_unparsable(path)) from None
    except OSError as exc:
        raise OptinError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    except ir.serde.SerdeError as exc:
        # e.g. a value name produced twice; the cause says which, the wrapper only names the graph
        cause = exc.__cause__ or exc
        raise OptinError(f"model {path} is not a valid ONNX graph: {first_line(cause)}") from None

    _check_complete(model, path)
    if model.graph.num_nodes() == 0:
        raise OptinError(f"model {path} has no nodes in its graph: nothing to prune")
    if not graph_input_names(model):
        raise OptinError(f"model {path} has no graph inputs: it cannot be run on calibration data")
    evidence = _quantisation_evidence(model)
    if evidence is not None:
        raise OptinError(f"{_QUANTISED_HINT} ({path}: {evidence})")
    half = _half_precision_evidence(model)
    if half is not None:
        raise OptinError(f"{_HALF_HINT} ({path}: {half})")
    _check_inline_data(model, path)
    _contain_external_data(model, source, path)
    _check_external_data(model, path)
    data_files = dict.fromkeys(tensor.path for tensor, _, _ in _external_tensor_sites(model))
    model.meta[_FILES_READ] = [source, *data_files]
    if _initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
        # Weights kept beside the file (the dynamo exporter's default, at any size) are read now:
        # a lazy reference is relative to this file's directory, and serialised for onnxruntime
        # it would be looked up relative to the working directory instead.
        ir.external_data.load_to_model(model)
    return model


def files_read(model: ir.Model) -> list[tuple[str, str]]:
    """The files :func:`load_model` read ``model`` from, labelled for error messages: the model
    file, then each external-data file (resolved). Empty for a model that was not loaded from a
    file. Outputs are checked against these before any work, so none can replace an input."""
    paths = model.meta.get(_FILES_READ, [])
    return [("input path" if i == 0 else "input model's external data file", path)
            for i, path in enumerate(paths)]


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, never touching the input model's files.

    Everything is first written into a temporary directory next to ``path`` (same filesystem, so
    ``os.replace`` is atomic) and then moved into place: a crash or a full disk leaves either the
    old output or the new one, never a half-written file. Models whose initializers exceed
    :data:`EXTERNAL_DATA_THRESHOLD_BYTES` get their weights in ``<name>.data`` beside the
    ``.onnx``; that file is moved first and the ``.onnx`` that references it last. Writing into a
    temporary directory (rather than a temporary file name) lets the ``.onnx`` record the data
    file's final relative name.

    A model loaded from an external-data file still reads its weights lazily from the input's data
    file, so saving refuses any output path that is the input (``input_path``) or one of the data
    files the model reads from. Smaller models are written self-contained: weights still living in
    the input's data file are copied in, because a reference to it would break once the output is
    moved away from the input, or silently change if the input's data is later rewritten.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        raise OptinError(f"cannot write {path}: directory {directory} does not exist")

    sites = _external_tensor_sites(model)
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = name + ".data"
    outputs = [path, os.path.join(directory, data_name)] if external else [path]
    _refuse_overwriting_inputs(outputs, input_path, [tensor.path for tensor, _, _ in sites])

    # With external data, ir.save itself streams the (lazy) initializers into the new data file;
    # only constants held in node attributes, which ir.save leaves as references, are inlined.
    to_inline = [
        (tensor, put) for tensor, put, is_initializer in sites if not (external and is_initializer)
    ]
    try:
        with tempfile.TemporaryDirectory(
            prefix=f".{name}.", suffix=".tmp", dir=directory, ignore_cleanup_errors=True
        ) as staging:
            staged = os.path.join(staging, name)
            with _inlined(to_inline):
                if external:
                    ir.save(model, staged, external_data=data_name)
                else:
                    ir.save(model, staged)
            if external:
                staged_data = os.path.join(staging, data_name)
                _fsync(staged_data)
                os.replace(staged_data, os.path.join(directory, data_name))
            _fsync(staged)
            os.replace(staged, path)
    except OSError as exc:
        raise OptinError(f"cannot write {path}: {exc.strerror or exc}") from None


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` to a ``ModelProto`` for APIs that take one (onnxruntime, onnx.checker).

    Only for models under the 2 GB protobuf limit: weights that are lazy external references stay
    references in the proto rather than being read in.
    """
    return ir.to_proto(model)


def load_calibration(
    path: str | os.PathLike,
    input_names: list[str],
    max_bytes: int = CALIBRATION_LIMIT_BYTES,
) -> dict[str, np.ndarray]:
    """Load calibration samples: an ``.npz`` with one array per graph input, first axis = sample.

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
                if name not in members:
                    raise OptinError(
                        f"calibration file {path} has no array for graph input '{name}'"
                        f" (it has: {', '.join(members) or 'no arrays'})"
                    )
            _check_declared_sizes(archive, {n: members[n] for n in input_names}, path, max_bytes)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in input_names}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise OptinError(f"calibration file {path} is corrupt: {exc}") from None
    return check_calibration(arrays, f"calibration file {path}")


def calibration_for(
    model: ir.Model,
    calib: str | os.PathLike | Mapping[str, np.ndarray],
    max_bytes: int = CALIBRATION_LIMIT_BYTES,
) -> dict[str, np.ndarray]:
    """The calibration arrays for ``model``'s inputs, from an ``.npz`` path or a mapping of arrays
    (a dict, or what ``np.load`` returns), checked alike either way, and against the model."""
    names = graph_input_names(model)
    if isinstance(calib, Mapping):
        missing = [n for n in names if n not in calib]
        if missing:
            raise OptinError(f"calibration data has no array for graph input '{missing[0]}'")
        source = "calibration data"
        arrays = check_calibration({n: calib[n] for n in names}, source)
    elif isinstance(calib, (str, os.PathLike)):
        source = f"calibration file {os.fspath(calib)}"
        arrays = load_calibration(calib, names, max_bytes)
    else:
        raise OptinError(
            f"calibration must be an .npz path or a mapping of arrays, got {type(calib).__name__}"
        )
    _check_token_inputs(model, arrays, source)
    return arrays


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


def graph_input_names(model: ir.Model) -> list[str]:
    """Names of the inputs a caller must feed: graph inputs that are not initializers.

    Older exporters also list every initializer as a graph input (with the initializer as its
    default); those are weights, not data, so they are left out.
    """
    return [value.name for value in model.graph.inputs if not value.is_initializer()]


def _diagnose_unparsable(path: str) -> str:
    """Explain why protobuf rejected ``path``: cut short, or not an ONNX model at all.

    Protobuf reports both as the same "Error parsing message". Walking the top-level fields of the
    wire format tells them apart: a file whose fields are all ``ModelProto`` fields but whose last
    one runs past the end of the file was truncated, while a field ``ModelProto`` does not have
    means the file is something else.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    truncated = f"model file {path} is truncated or corrupt: its data ends in the middle of a field"
    fields = onnx.ModelProto.DESCRIPTOR.fields_by_number
    length_delimited = {
        FieldDescriptor.TYPE_MESSAGE,
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BYTES,
    }
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        if key is None:
            return truncated
        field = fields.get(key >> 3)
        expected_wire_type = 2 if field is not None and field.type in length_delimited else 0
        if field is None or key & 7 != expected_wire_type:
            return f"model file {path} is not an ONNX file (protobuf parse failed)"
        value, position = _read_varint(data, position)
        if value is None:
            return truncated
        if expected_wire_type == 2:
            position += value
            if position > len(data):
                return truncated
    return f"model file {path} is truncated or corrupt: protobuf could not parse the data inside it"


def _read_varint(data: bytes, position: int) -> tuple[int | None, int]:
    """Decode one protobuf varint at ``position``; ``None`` if the data ends before it does."""
    value = 0
    shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


def _check_complete(model: ir.Model, path: str) -> None:
    """Catch a model cut short at a field boundary, which protobuf parses without complaint.

    Exporters write ``opset_import`` after the graph, so a model with none, or with nodes in a
    domain it does not import, lost its tail (or was never a complete ONNX model).
    """
    if not model.opset_imports:
        raise OptinError(f"model file {path} is truncated or not an ONNX model: it imports no opset")
    imported = {_canonical_domain(domain) for domain in model.opset_imports}
    for node in _all_nodes(model):
        if node.domain == _ORT_DOMAIN and _ORT_DOMAIN not in imported:
            # onnxruntime's transformer optimizer leaves its own domain unimported in the model it
            # returns (and onnxruntime runs it anyway): import it, so what we write is valid ONNX.
            model.opset_imports[_ORT_DOMAIN] = 1
            imported.add(_ORT_DOMAIN)
        if _canonical_domain(node.domain) not in imported:
            raise OptinError(
                f"model file {path} is truncated or corrupt: node '{node.name}' ({node.op_type}) uses"
                f" domain '{node.domain}', which the model does not import"
            )


#: onnxruntime's contrib-op domain (fused Attention, SkipLayerNormalization, ...).
_ORT_DOMAIN = "com.microsoft"


def _canonical_domain(domain: str) -> str:
    """The default ONNX domain is spelled either "" or "ai.onnx"."""
    return "" if domain == "ai.onnx" else domain


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node: main graph, subgraphs (If/Loop/Scan bodies) and model-local functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _quantisation_evidence(model: ir.Model) -> str | None:
    """Describe the first sign that ``model`` is quantised, or return ``None`` if it is fp."""
    for node in _all_nodes(model):
        if node.op_type in _QUANTISED_OPS or node.op_type.startswith("QLinear"):
            return f"node '{node.name}' is {node.op_type}"
        if node.op_type in _WEIGHT_OPS and _canonical_domain(node.domain) == "":
            for value in node.inputs:
                source = _skip_casts(value)
                if source is not None and source.is_initializer() and source.dtype in _LOW_BIT_TYPES:
                    return (
                        f"{source.dtype.name} initializer '{source.name}'"
                        f" feeds {node.op_type} '{node.name}'"
                    )
    return None


def _half_precision_evidence(model: ir.Model) -> str | None:
    """Describe the first float16/bfloat16 graph input, output or initializer, if any.

    The masks and constants the scoring stage inserts are float32, and onnxruntime refuses to mix
    them with half-precision values, minutes into scoring; refusing at load says so at once.
    """
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs),
                         ("initializer", model.graph.initializers.values())):
        for value in values:
            if value.dtype in _HALF_TYPES:
                return f"{kind} '{value.name}' is {value.dtype.name}"
    return None


def _check_inline_data(model: ir.Model, path: str) -> None:
    """Every initializer stored in the file holds exactly the data its shape and type need.

    A tensor whose bytes were cut short parses fine and fails only when a stage reads it, as a
    numpy reshape error. External tensors are checked against their files separately.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            try:
                tensor.numpy()
            except ValueError as exc:
                raise OptinError(
                    f"model {path} is corrupt: initializer '{value.name}' ({tensor.dtype.name},"
                    f" shape {list(tensor.shape)}) does not hold the data its shape needs"
                    f" ({first_line(exc)})"
                ) from None


def _skip_casts(value: ir.Value | None) -> ir.Value | None:
    """Follow Casts upstream: weight-only quantisation stores integer weights and casts them up."""
    while value is not None:
        producer = value.producer()
        if producer is None or producer.op_type != "Cast":
            return value
        value = producer.inputs[0]
    return None


def _contain_external_data(model: ir.Model, source: str, shown: str) -> None:
    """Refuse external data outside the model's folder, and pin each reference to its real file.

    A model is a file anyone can hand over; its external-data ``location`` must not make the tool
    read (and copy into OUT) a file beside or above it, such as ``../../etc/passwd``. onnx-ir
    checks this only when the model path has a directory part, and only when a tensor is read,
    as a ``ValueError``. Here every form is refused up front, for initializers, tensor attributes
    and function bodies alike. Each reference is then replaced by one naming the resolved file
    directly, so nothing later resolves the location again against a different base, and a
    symlink swapped after this check is not followed.

    A Hugging Face cache (``<cache>/snapshots/<rev>/...``, files symlinked into
    ``<cache>/blobs``) is a legitimate layout: a target directly in that same cache's ``blobs``
    folder is accepted.
    """
    folder = os.path.dirname(source)
    real_folder = os.path.realpath(folder)
    blobs = _hf_cache_blobs(folder)
    for tensor, put, _ in _external_tensor_sites(model):
        location = os.fspath(tensor.location)
        where = f"model {shown}: external data of tensor '{tensor.name}' at '{location}'"
        if not location or "\0" in location or os.path.isabs(location) or not _within(
            os.path.normpath(os.path.join(folder, location)), folder
        ):
            raise OptinError(f"{where} is outside the model's folder {folder}: refusing to read it")
        real = os.path.realpath(os.path.join(folder, location))
        if not _within(real, real_folder) and not (blobs and os.path.dirname(real) == blobs):
            raise OptinError(
                f"{where} resolves through a symlink to {real}, outside the model's folder"
                f" {folder}: refusing to read it"
            )
        if os.path.isfile(real) and os.stat(real).st_nlink > 1:
            raise OptinError(
                f"{where}: {real} has other hard links, so it may be a file from outside the"
                " model's folder: refusing to read it (replace it with a copy of itself)"
            )
        put(
            ir.ExternalTensor(
                os.path.basename(real),
                offset=tensor.offset,
                length=tensor.length,
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
                doc_string=tensor.doc_string,
                metadata_props=dict(tensor.metadata_props),
                base_dir=os.path.dirname(real),
            )
        )


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (both absolute and normalised)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _hf_cache_blobs(folder: str) -> str | None:
    """The real ``blobs`` folder of the Hugging Face cache ``folder`` is a snapshot in, if any.

    The cache stores each repository as ``<cache>/blobs/<hash>`` and shows each revision as
    ``<cache>/snapshots/<rev>/<file>`` symlinks into it (``../../blobs/<hash>``, one ``..`` more
    per subfolder), so ``folder`` is in a snapshot when one of its ancestors is a direct child
    of a folder named ``snapshots`` that has a sibling ``blobs``.
    """
    ancestor = folder
    while os.path.dirname(ancestor) != ancestor:
        parent = os.path.dirname(ancestor)
        if os.path.basename(parent) == "snapshots":
            blobs = os.path.join(os.path.dirname(parent), "blobs")
            return os.path.realpath(blobs) if os.path.isdir(blobs) else None
        ancestor = parent
    return None


def _check_external_data(model: ir.Model, path: str) -> None:
    """Check each external data file exists and is long enough, before anything reads it lazily."""
    for tensor, _, _ in _external_tensor_sites(model):
        data_path = tensor.path
        if not os.path.isfile(data_path):
            raise OptinError(
                f"model {path} needs external data file {data_path} (for tensor '{tensor.name}'),"
                " which does not exist: copy it next to the model"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = os.path.getsize(data_path)
        if size < end:
            raise OptinError(
                f"external data file {data_path} of model {path} is truncated: tensor '{tensor.name}'"
                f" needs bytes up to {end}, the file has {size}"
            )


# An external tensor, a function that puts a replacement tensor where it sits, and whether it is
# an initializer (as opposed to the value of a node attribute such as Constant's).
_Site = tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None], bool]


def _external_tensor_sites(model: ir.Model) -> list[_Site]:
    """Every tensor in ``model`` whose data lives in an external file, and where it sits."""
    sites: list[_Site] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                sites.append((value.const_value, functools.partial(setattr, value, "const_value"), True))
    for node in _all_nodes(model):
        for name, attr in node.attributes.items():
            if attr.is_ref() or attr.type != ir.AttributeType.TENSOR:
                continue
            if isinstance(attr.value, ir.ExternalTensor):
                sites.append((attr.value, functools.partial(_set_tensor_attribute, node, name), False))
    return sites


def _set_tensor_attribute(node: ir.Node, name: str, tensor: ir.TensorProtocol) -> None:
    node.attributes[name] = ir.Attr(name, ir.AttributeType.TENSOR, tensor)


@contextlib.contextmanager
def _inlined(
    sites: list[tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None]]],
) -> Iterator[None]:
    """Temporarily replace external tensors with in-memory copies, so saving embeds their data.

    The originals are put back afterwards: saving must not change the caller's model.
    """
    originals = [tensor for tensor, _ in sites]
    copies = ir.external_data.convert_tensors_from_external(originals)
    for (_, put), copy in zip(sites, copies):
        put(copy)
    try:
        yield
    finally:
        for (_, put), original in zip(sites, originals):
            put(original)


def _initializer_bytes(model: ir.Model) -> int:
    """Total initializer size, from shapes and dtypes alone (lazy external data is not read)."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def _refuse_overwriting_inputs(
    outputs: list[str], input_path: str | os.PathLike | None, data_paths: list[str]
) -> None:
    """Raise if writing ``outputs`` would replace the input model or a data file it reads from."""
    for output in outputs:
        if input_path is not None and same_file(output, os.fspath(input_path)):
            raise OptinError(f"output path {output} is the input path: refusing to overwrite the input")
        for data_path in data_paths:
            if same_file(output, data_path):
                raise OptinError(
                    f"output {output} is the external data file {data_path} the model reads its weights"
                    " from: refusing to overwrite the input"
                )


def _fsync(path: str) -> None:
    """Flush ``path`` to disk, so the rename that publishes it never exposes unwritten data."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
