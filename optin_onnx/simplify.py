"""Stage *simplify*: re-run onnx-simplifier on the slim graph (folds the per-use shape copies the
rewrite made, shares equal constants again). Dynamic axes keep their declared names. If onnxsim
fails or cannot check its result, the unsimplified graph is kept and the reason is returned.

onnxsim is not always a speed-up: on BERT exports it rewrites MatMul+Add over 3-D inputs into
Reshape -> Gemm -> Reshape, which hides the bias-GELU and skip-LayerNorm patterns onnxruntime fuses
and can make the graph slower (docs/RESULTS.md, "One-off measurements"). So mode "auto" keeps the
simplified graph only if onnxruntime runs it at least as fast.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from optin_onnx.errors import OptinError
from optin_onnx.latency import compare_latency
from optin_onnx.runtime import tensor_bytes

#: Protobuf cannot serialise a single message over 2 GB; onnxsim needs to (with room for the
#: graph beside the weights).
_ONNXSIM_LIMIT = 1_900_000_000


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Return (model, None) when simplified, else (the input model, why it was not)."""
    if tensor_bytes(model) > _ONNXSIM_LIMIT:
        return model, "onnxsim skipped: the model is over 2 GB"
    try:
        import onnxsim

        out, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim raises RuntimeError, ValueError and its own types
        return model, f"onnxsim failed ({str(exc).splitlines()[0][:200]}); kept the unsimplified graph"
    if not ok:
        return model, "onnxsim could not validate its result; kept the unsimplified graph"
    _keep_axis_names(model, out)
    return out, None


def _keep_axis_names(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Give ``after``'s graph inputs and outputs the symbolic axis names ``before`` declared
    (in place). onnxsim's shape inference renames some (``batch`` becomes ``unk__0`` where two
    inputs disagree on a name), and a serving stack binds its dynamic axes by those names. A
    dimension onnxsim proved static stays static."""
    declared = {v.name: v.type.tensor_type.shape for v in (*before.graph.input,
                                                          *before.graph.output)
                if v.type.HasField("tensor_type")}
    for v in (*after.graph.input, *after.graph.output):
        old = declared.get(v.name)
        if old is None or not v.type.HasField("tensor_type"):
            continue
        new = v.type.tensor_type.shape
        if len(new.dim) != len(old.dim):
            continue
        for a, b in zip(old.dim, new.dim):
            if a.HasField("dim_param") and not b.HasField("dim_value"):
                b.dim_param = a.dim_param


def choose(raw: onnx.ModelProto, feeds: dict[str, np.ndarray], mode: str = "auto",
           providers: Sequence[str] | None = None, seconds: float = 4.0
           ) -> tuple[onnx.ModelProto, str | None]:
    """Stage entry: ``mode`` "on" (always onnxsim), "off", or "auto" (the faster of the two on
    ``feeds``, timed interleaved). Returns the model and a note for the report."""
    if mode not in ("auto", "on", "off"):
        raise OptinError(f"--simplify must be auto, on or off, got '{mode}'")
    if mode == "off":
        return raw, None
    simplified, why = simplify(raw)
    if why or mode == "on":
        return simplified, why
    from optin_onnx.errors import first_line
    from optin_onnx.verify import RUN_ERRORS

    try:
        t_raw, t_sim = compare_latency(raw, simplified, feeds,
                                       providers=list(providers or []) or None, max_seconds=seconds)
    except RUN_ERRORS as exc:
        return raw, (f"onnxsim result dropped: it could not be timed at the last latency case's "
                     f"shape ({first_line(exc)})")
    if t_sim.median_ms <= t_raw.median_ms:
        return simplified, (f"onnxsim kept: {t_sim.median_ms:.2f} ms vs {t_raw.median_ms:.2f} ms "
                            f"unsimplified")
    return raw, (f"onnxsim result dropped: onnxruntime ran it slower ({t_sim.median_ms:.2f} ms vs "
                 f"{t_raw.median_ms:.2f} ms unsimplified)")
