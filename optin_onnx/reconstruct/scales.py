"""Stage *reconstruct*, ``--reconstruct scales``: one least-squares scale per kept unit.

In the spirit of Kwon et al.'s mask tuning, but from onnxruntime activations and on OPTIN's mask:
block by block, in graph order, find one scale per kept unit so that the pruned block's output
(its consumer's output: the attention output projection, or the FFN's second linear layer, before
the residual add) matches the dense model's on the calibration set, given the inputs the *pruned
and already corrected* model feeds it:

    min_s || sum_u s_u * X_u @ W_u  -  Y_dense ||^2  +  damping * || s - 1 ||^2

X_u are unit u's channels of the consumer input (captured from the masked model), W_u its rows of
the consumer weight. The normal equations need only n x n matrices: for neurons
G = (X^T X) * (W W^T) elementwise; for heads the per-head contributions are formed explicitly.
Conv channel groups are corrected where their one consumer is a matrix product per position (a
1x1 conv with stride 1 and no padding, a Gemm/MatMul): each position is then a row, the filter
matrix W[:, :, 0, 0]^T the weight. Groups with several consumers (a residual stream) are left as
they are, with the reason.
A fit is rejected (scales stay 1) when it does not lower the loss it fits or a scale leaves
[-10, 10]. Scales are folded into the consumer's weight rows, so the result is still a plain graph.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Role, Structure
from optin_onnx.calibrate import CalibrationSet, capture
from optin_onnx.graph import const_array, copy_model, nodes_by_name
from optin_onnx.instrument import masked_model, oriented, unit_masks

MAX_SCALE = 10.0


@dataclass
class Correction:
    block: str
    loss_before: float
    loss_after: float
    applied: bool
    reason: str = ""


@dataclass
class ReconstructResult:
    model: ir.Model
    corrections: list[Correction] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The report's line: how many blocks were corrected, and why the others were not."""
        applied = [c.block for c in self.corrections if c.applied]
        return [f"least-squares scales applied to {len(applied)} of {len(self.corrections)} "
                f"pruned blocks" + "".join(f"; {c.block} kept as is ({c.reason})"
                                           for c in self.corrections if not c.applied)]


def _normal_equations(block: Block, x: np.ndarray, w: np.ndarray, y: np.ndarray,
                      units: Sequence[int], role: Role) -> tuple[np.ndarray, np.ndarray, float]:
    """G, b and y.y of the least-squares problem over the kept units (float64)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = y.reshape(-1, y.shape[-1]).astype(np.float64)
    w = w.astype(np.float64)
    size = block.unit_size if role is Role.FLAT else 1
    if size == 1:
        xk, wk = x[:, units], w[units]
        g = (xk.T @ xk) * (wk @ wk.T)
        b = np.einsum("tu,tu->u", xk, y @ wk.T)
    else:
        parts = [x[:, u * size:(u + 1) * size] @ w[u * size:(u + 1) * size] for u in units]
        flat = np.stack([p.reshape(-1) for p in parts])
        g = flat @ flat.T
        b = flat @ y.reshape(-1)
    return g, b, float(np.sum(y * y))


def consumer_matrix(node: ir.Node, c: Consumer) -> tuple[np.ndarray, int] | None:
    """The consumer's weight as [K, N] and the output's channel axis, or None when the consumer
    is not a plain matrix product per position (a Gemm that scales or transposes its data input,
    a weight that is not a constant matrix, a conv other than 1x1 with stride 1 and no padding)."""
    weight = const_array(node.inputs[c.weight_index])
    if weight is None:
        return None
    if node.op_type == "MatMul":
        return (oriented(weight, c), -1) if weight.ndim == 2 else None
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
                attrs.get("beta", 1.0) != 1.0 or c.data_index != 0:
            return None
        return oriented(weight, c), -1
    if node.op_type != "Conv" or weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if attrs.get("group", 1) != 1 or any(v != 1 for v in attrs.get("strides", [1])) or \
            any(v != 0 for v in attrs.get("pads", [0])) or \
            attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    return weight.reshape(weight.shape[0], weight.shape[1]).T, 1


def _channels_last(arr: np.ndarray, axis: int) -> np.ndarray:
    return arr if axis in (-1, arr.ndim - 1) else np.moveaxis(arr, axis, -1)


def _loss(g: np.ndarray, b: np.ndarray, yy: float, s: np.ndarray) -> float:
    return float(s @ g @ s - 2 * b @ s + yy)


def reconstruct(model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]],
                cal: CalibrationSet, damping: float = 1e-2,
                providers: Sequence[str] | None = None) -> ReconstructResult:
    """A copy of ``model`` whose consumer weights carry least-squares scales for the kept units.

    ``damping`` is relative: it is multiplied by the mean diagonal of each block's G, so it means
    the same for every block whatever the activation scale.
    """
    out = copy_model(model)
    result = ReconstructResult(out)
    dense_proto = ir.to_proto(model)
    nodes = nodes_by_name(model.graph)
    masks = unit_masks(structure, keep)
    targets = {}
    for b in structure.blocks:
        c = b.consumers[0]
        targets[b.name] = nodes[c.node].outputs[0].name
    teacher = capture(dense_proto, cal, sorted(set(targets.values())), providers)
    for b in structure.blocks:
        units = sorted(int(u) for u in keep.get(b.name, range(b.n_units)))
        if not units or len(units) == b.n_units:
            continue
        why = (f"{len(b.consumers)} consumers" if len(b.consumers) != 1 else
               "its consumer reads a flattened feature map" if b.consumers[0].repeat != 1 else
               "its consumer reads it with other groups (Concat)"
               if b.consumers[0].offset or b.consumers[0].span else
               "its units are grouped query heads" if b.consumers[0].group != 1 else "")
        if why:
            result.corrections.append(Correction(b.name, 0.0, 0.0, False, why))
            continue
        c = b.consumers[0]
        out_nodes = nodes_by_name(out.graph)
        matrix = consumer_matrix(out_nodes[c.node], c)
        if matrix is None:
            result.corrections.append(Correction(b.name, 0.0, 0.0, False,
                                                 "the consumer is not a 1x1 conv or a matrix "
                                                 "product"))
            continue
        w, y_axis = matrix
        student_proto = ir.to_proto(masked_model(out, structure, masks))
        student_nodes = {n.name: n for n in student_proto.graph.node}
        x_name = student_nodes[c.node].input[c.data_index]
        xs = capture(student_proto, cal, [x_name], providers)
        weight_value = out_nodes[c.node].inputs[c.weight_index]
        weight = const_array(weight_value)
        bias = None
        if out_nodes[c.node].op_type in ("Gemm", "Conv") and len(out_nodes[c.node].inputs) > 2 \
                and out_nodes[c.node].inputs[2] is not None:
            bias = const_array(out_nodes[c.node].inputs[2])
        g = np.zeros((len(units), len(units)))
        bvec = np.zeros(len(units))
        yy = 0.0
        for xv, tv in zip(xs, teacher):
            y = _channels_last(tv[targets[b.name]], y_axis)
            if bias is not None:
                y = y - bias
            x = _channels_last(xv[x_name], c.data_axis)
            gi, bi, yi = _normal_equations(b, x, w, y, units, c.role)
            g, bvec, yy = g + gi, bvec + bi, yy + yi
        ones = np.ones(len(units))
        lam = damping * float(np.mean(np.diag(g))) if len(units) else 0.0
        try:
            s = np.linalg.solve(g + lam * np.eye(len(units)), bvec + lam * ones)
        except np.linalg.LinAlgError:
            result.corrections.append(Correction(b.name, 0.0, 0.0, False, "singular system"))
            continue
        before, after = _loss(g, bvec, yy, ones), _loss(g, bvec, yy, s)
        if not np.all(np.isfinite(s)) or np.max(np.abs(s)) > MAX_SCALE:
            result.corrections.append(Correction(b.name, before, after, False,
                                                 f"a scale left [-{MAX_SCALE:g}, {MAX_SCALE:g}]"))
            continue
        if after >= before:
            result.corrections.append(Correction(b.name, before, after, False,
                                                 "the fit did not lower the loss"))
            continue
        size = b.unit_size if c.role is Role.FLAT else 1
        factor = np.ones(w.shape[0])
        for su, u in zip(s, units):
            factor[u * size:(u + 1) * size] = su
        # Multiply the contracted axis of the weight as stored (rows of [K, N], axis 1 of a conv).
        shape = [1] * weight.ndim
        shape[c.weight_axis] = -1
        new = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
        name = f"{weight_value.name}__reconstructed"
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(new), name=name))
        out.graph.register_initializer(value)
        out_nodes[c.node].replace_input_with(c.weight_index, value)
        result.corrections.append(Correction(b.name, before, after, True))
    return result
