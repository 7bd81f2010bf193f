"""The refit's model and data layouts: one model for the dense teacher and the pruned student,
with masks and fitted weights as inputs (:class:`Session`, walked by :mod:`.walk`), activations as rows of a least-squares problem (:func:`rows`, :class:`Window` for a k x k conv's
im2col patches), the whole model's held-out check (:func:`relative_error`), and the write of a
fitted constant into the model (:func:`replace_constant`, :func:`shared`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Consumer, Structure
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet
from optin_onnx.graph import const_array, const_root, nodes_by_name
from optin_onnx.instrument import channel_mask, mask_input_name, masked_model
from optin_onnx.reconstruct.walk import Walk


@dataclass(frozen=True)
class Window:
    """A k x k conv's geometry (group 1, explicit padding): its input is read as im2col patches,
    one row per output position, so the conv is a matrix product of [C*kh*kw, M]."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]

    @property
    def size(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def patches(self, x: np.ndarray) -> np.ndarray:
        """[B, C, H, W] -> [B*Ho*Wo, C*kh*kw], rows in the conv output's (b, h, w) order and
        columns in the weight's (c, i, j) order."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        win = np.lib.stride_tricks.sliding_window_view(
            x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw]
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)



def rows(arr: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """``arr`` as [positions, channels] (channel ``axis`` last), real tokens only where
    ``mask`` (the chunk's attention mask) has one entry per position."""
    if axis not in (-1, arr.ndim - 1):
        arr = np.moveaxis(arr, axis, -1)
    rows = arr.reshape(-1, arr.shape[-1])
    if mask is not None and mask.size == rows.shape[0]:
        rows = rows[mask.reshape(-1).astype(bool)]
    return rows



class Session:
    """The model every run of the refit uses: the dense model with a mask input per block
    (:func:`~optin_onnx.instrument.masked_model`) and every weight and bias a fit can move as a
    graph input of its own. The dense teacher (masks of ones, the weights as they were), the
    pruned student with the fits so far and the student as pruned are feeds of this one model,
    walked through it segment by segment (:class:`~optin_onnx.reconstruct.walk.Walk`). One
    model per fit would instead serialise and optimise the whole model once per consumer, and
    a whole-model session per run costs a forward pass per fit (docs/RESULTS.md, "Weight
    refit")."""

    def __init__(self, model: ir.Model, structure: Structure, masks: Mapping[str, np.ndarray],
                 consumers: Sequence[Consumer], slots: Sequence[tuple[str, int]],
                 providers: Sequence[str] | None) -> None:
        shared = masked_model(model, structure)
        nodes = nodes_by_name(shared.graph)
        taken = {v.name for v in shared.graph.inputs} | set(shared.graph.initializers)
        self.inputs: dict[tuple[str, int], str] = {}
        original: dict[str, np.ndarray] = {}
        for node_name, slot in dict.fromkeys(slots):
            node = nodes[node_name]
            arr = np.ascontiguousarray(const_array(node.inputs[slot]))
            name = f"optin_refit__{node_name}__{slot}"
            while name in taken:
                name += "_"
            taken.add(name)
            # Its own input per (node, slot): a weight tied between layers is fitted per use, as
            # :func:`_replace` gives each use its own copy.
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                             shape=ir.Shape(arr.shape))
            shared.graph.inputs.append(value)
            node.replace_input_with(slot, value)
            self.inputs[(node_name, slot)] = name
            original[name] = arr
        #: the masked model's name of each consumer's data input (after its mask Mul)
        self.data = {(c.node, c.data_index): nodes[c.node].inputs[c.data_index].name
                     for c in consumers}
        student_masks, dense_masks = {}, {}
        for b in structure.blocks:
            c = b.consumers[0]
            student_masks[mask_input_name(b)] = channel_mask(b, masks[b.name], c.role, c.group)
            dense_masks[mask_input_name(b)] = np.ones_like(student_masks[mask_input_name(b)])
        self.feeds = {"teacher": {**dense_masks, **original},
                      "student": {**student_masks, **original},
                      "baseline": {**student_masks, **original}}
        self.proto = ir.to_proto(shared)
        #: each node's position in the walk's node order
        self.position = {n.name: i for i, n in enumerate(self.proto.graph.node)}
        self.providers = providers
        self.walk: Walk | None = None

    def start(self, cal: CalibrationSet, held: CalibrationSet) -> Walk:
        """The walk of the refit: teacher and student on the fitting and the held-out samples,
        the uncorrected student on the held-out ones."""
        self.walk = Walk(self.proto, self.feeds, {"teacher": (cal, held), "student": (cal, held),
                                                  "baseline": (held,)}, self.providers)
        return self.walk

    def set(self, slot: tuple[str, int], arr: np.ndarray) -> None:
        """A fit's new weight or bias, fed to the student from now on."""
        self.walk.set("student", self.inputs[slot], np.ascontiguousarray(arr))


def relative_error(walk: Walk, data: CalibrationSet, output: str, walker: str) -> float:
    """Squared error of ``walker``'s ``output`` to the teacher's, relative to the teacher's
    squared norm (real tokens only for per-token outputs)."""
    err = norm = 0.0
    for chunk, got, want in zip(data.chunks, walk.values(walker, data, [output]),
                                walk.values("teacher", data, [output])):
        mask = chunk.feeds.get(MASK_INPUT)
        g = rows(got[output].astype(np.float64), -1, mask)
        w = rows(want[output].astype(np.float64), -1, mask)
        err += float(np.sum((g - w) ** 2))
        norm += float(np.sum(w * w))
    return err / norm if norm > 0 else err


def shared(model: ir.Model, value: ir.Value | None) -> bool:
    """Whether the constant behind ``value`` is read by more than one node (a weight tied
    between layers, as in ALBERT): a fit of one use would unshare it."""
    root = const_root(value) if value is not None else None
    return root is not None and sum(const_root(v) is root for n in model.graph
                                    if n.op_type != "Identity" for v in n.inputs
                                    if v is not None) > 1


def replace_constant(model: ir.Model, node: ir.Node, slot: int, arr: np.ndarray,
                     name: str) -> None:
    """Give ``node``'s input ``slot`` a new constant (its own copy: a shared weight or bias keeps
    its value for every other use)."""
    fresh = f"{name}__refit"
    names = {v.name for v in model.graph.initializers.values()}
    while fresh in names:
        fresh += "_"
    value = ir.Value(name=fresh, const_value=ir.tensor(np.ascontiguousarray(arr), name=fresh))
    model.graph.register_initializer(value)
    node.replace_input_with(slot, value)
