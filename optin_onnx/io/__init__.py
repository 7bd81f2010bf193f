"""Loading, validating and saving models and calibration data (calibration files in
:mod:`.calibration`, external-data containment in :mod:`.external`).

Everything that touches the user's files goes through here, so that each bad input is reported as
one :class:`~optin_onnx.errors.OptinError` line naming the file and the problem instead of a
protobuf or numpy traceback from deep inside a pruning stage, and so that writing an output can
never damage the input it was derived from.
"""
from __future__ import annotations

import os
import tempfile

import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from optin_onnx.errors import OptinError, first_line
from optin_onnx.guard import same_file
from optin_onnx.io.calibration import (CALIBRATION_LIMIT_BYTES, cache_inputs, calibration_for,
                                       check_calibration, empty_past, graph_input_names,
                                       load_calibration)
from optin_onnx.io.external import (all_nodes, check_external_data, contain_external_data,
                                    external_tensor_sites, initializer_bytes, inlined)

__all__ = ["CALIBRATION_LIMIT_BYTES", "EXTERNAL_DATA_THRESHOLD_BYTES", "cache_inputs",
           "calibration_for", "check_calibration", "empty_past", "files_read", "graph_input_names",
           "load_calibration", "load_model", "model_proto", "read_model", "save_model"]

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

# Key of ir.Model.meta (kept in memory, never serialised) under which load_model records its files.
_FILES_READ = "optin_onnx.files_read"

_QUANTISED_HINT = "quantised models are not supported: prune the fp32 model, then quantise"
_HALF_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_HALF_HINT = (
    "float16/bfloat16 models are not supported: prune the fp32 model, then convert the result"
    " (e.g. onnxconverter_common.float16.convert_float_to_float16)"
)


def read_model(path: str | os.PathLike) -> ir.Model:
    """Parse an ONNX file into a model, with one-line errors for a missing, empty, truncated or
    invalid file; nothing about prunability is checked (``make-calib`` reads a model only for its
    inputs, and a half-precision one still needs calibration data). External data stays unread.
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
        return ir.load(source)
    except DecodeError:
        raise OptinError(_diagnose_unparsable(path)) from None
    except OSError as exc:
        raise OptinError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    except ir.serde.SerdeError as exc:
        # e.g. a value name produced twice; the cause says which, the wrapper only names the graph
        cause = exc.__cause__ or exc
        raise OptinError(f"model {path} is not a valid ONNX graph: {first_line(cause)}") from None


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
    source = os.path.abspath(path)
    model = read_model(path)
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
    contain_external_data(model, source, path)
    check_external_data(model, path)
    data_files = dict.fromkeys(tensor.path for tensor, _, _ in external_tensor_sites(model))
    model.meta[_FILES_READ] = [source, *data_files]
    if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
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

    sites = external_tensor_sites(model)
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
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
            with inlined(to_inline):
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
    for node in all_nodes(model):
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


def _quantisation_evidence(model: ir.Model) -> str | None:
    """Describe the first sign that ``model`` is quantised, or return ``None`` if it is fp."""
    for node in all_nodes(model):
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
