"""onnxruntime sessions for every stage, from an in-memory model of any size.

Protobuf cannot serialise a message over 2 GB, so a large model is written once to a private
temporary directory with its weights as external data and the session is opened from that path.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from optin_onnx.errors import OptinError

#: Leave headroom under protobuf's 2 GiB hard limit.
SERIALIZE_LIMIT = 1_800_000_000


def session(model: onnx.ModelProto | str | os.PathLike, providers: Sequence[str] | None = None,
            options: ort.SessionOptions | None = None, optimize: bool = True
            ) -> ort.InferenceSession:
    """Open ``model`` (a proto or a path). ``optimize=False`` keeps every value as written (the
    probe and the activation capture need the unfused graph's intermediate values)."""
    so = options or ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(str(model), so, providers=providers)
        if model.ByteSize() <= SERIALIZE_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory(prefix="optin-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise OptinError(f"onnxruntime could not load the model: {str(exc).splitlines()[0]}") from exc
