"""Stage *simplify*: re-run onnx-simplifier on the slim graph (folds the per-use shape copies the
rewrite made, shares equal constants again). Dynamic input axes are kept as they are. If onnxsim
fails or cannot check its result, the unsimplified graph is kept and the reason is returned."""
from __future__ import annotations

import onnx

#: Protobuf cannot serialise a single message over 2 GB; onnxsim needs to.
_ONNXSIM_LIMIT = 2_000_000_000


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Return (model, None) when simplified, else (the input model, why it was not)."""
    if model.ByteSize() > _ONNXSIM_LIMIT:
        return model, "onnxsim skipped: the model is over 2 GB"
    try:
        import onnxsim

        out, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim raises RuntimeError, ValueError and its own types
        return model, f"onnxsim failed ({str(exc).splitlines()[0][:200]}); kept the unsimplified graph"
    if not ok:
        return model, "onnxsim could not validate its result; kept the unsimplified graph"
    return out, None
