"""The refit's runs and data layouts: one onnxruntime session for the dense teacher and the
pruned student (:class:`Session`), the dense values at the refit's points (:class:`Teacher`),
activations as rows of a least-squares problem (:func:`rows`, :class:`Window` for a k x k conv's
im2col patches), the whole model's held-out check (:func:`relative_error`), and the write of a
fitted constant into the model (:func:`replace_constant`, :func:`shared`)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx import runtime
from optin_onnx.analysis import Consumer, Structure
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet
from optin_onnx.graph import const_array, const_root, nodes_by_name
from optin_onnx.instrument import channel_mask, mask_input_name, masked_model

#: Dense activations at every refit point are kept in memory up to this size (else recomputed for
#: each consumer: one more dense run per consumer).
TEACHER_CACHE_BYTES = 1 << 30


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
    """One onnxruntime session for every run of the refit: the dense model with a mask input per
    block (:func:`~optin_onnx.instrument.masked_model`) and every weight and bias a fit can move
    as a graph input of its own, fed at each run. The dense teacher (masks of ones, the weights
    as they were), the pruned student before and after each fit, and the whole model's check are
    all feeds of this one session. A session per fit would instead serialise and optimise the
    whole model once per consumer, which costs more than the fits' runs (the demo model's
    profile: docs/RESULTS.md, "Weight refit")."""

    def __init__(self, model: ir.Model, structure: Structure, masks: Mapping[str, np.ndarray],
                 consumers: Sequence[Consumer], slots: Sequence[tuple[str, int]],
                 points: Sequence[str], providers: Sequence[str] | None) -> None:
        shared = masked_model(model, structure)
        nodes = nodes_by_name(shared.graph)
        taken = {v.name for v in shared.graph.inputs} | set(shared.graph.initializers)
        self.inputs: dict[tuple[str, int], str] = {}
        self.original: dict[str, np.ndarray] = {}
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
            self.original[name] = arr
        self.current = dict(self.original)
        #: the masked model's name of each consumer's data input (after its mask Mul)
        self.data = {(c.node, c.data_index): nodes[c.node].inputs[c.data_index].name
                     for c in consumers}
        self.student_masks, self.dense_masks = {}, {}
        for b in structure.blocks:
            c = b.consumers[0]
            self.student_masks[mask_input_name(b)] = channel_mask(b, masks[b.name], c.role,
                                                                  c.group)
            self.dense_masks[mask_input_name(b)] = np.ones_like(
                self.student_masks[mask_input_name(b)])
        names = list(dict.fromkeys([*points, *self.data.values()]))
        self.sess = runtime.session(ir.to_proto(shared), providers, outputs=names)

    def set(self, slot: tuple[str, int], arr: np.ndarray) -> None:
        """A fit's new weight or bias, fed to every later run."""
        self.current[self.inputs[slot]] = np.ascontiguousarray(arr)

    def runs(self, data: CalibrationSet, names: list[str], *, dense: bool = False,
             fitted: bool = True) -> Iterator[tuple[np.ndarray | None, dict[str, np.ndarray]]]:
        """(attention mask or None, {name: value}) chunk by chunk (one chunk's activations at a
        time, never a whole set's), of the dense model (``dense``) or the pruned one, with the
        fits made so far (``fitted``) or the weights as they were."""
        extra = {**(self.dense_masks if dense else self.student_masks),
                 **(self.current if fitted and not dense else self.original)}
        for chunk in data.chunks:
            yield (chunk.feeds.get(MASK_INPUT),
                   dict(zip(names, self.sess.run(names, {**chunk.feeds, **extra}))))


class Teacher:
    """The dense model's values at the refit's points, chunk by chunk. The fits ask for their
    points in graph order (``names``' order), each point once, so the teacher runs the dense model
    for as many of the next points as fit in :data:`TEACHER_CACHE_BYTES` (per-sample sizes taken
    from the first chunk, with room for longer chunks) and keeps them until a fit asks for a point
    past them: one dense pass per set where every point fits (a small model), one per window of
    points on a large one (EfficientNet's maps at 224 x 224), instead of one per fit. A point
    that alone exceeds the limit, or one asked for out of order, is streamed: the dense model
    runs again for that request, trading time for bounded memory."""

    def __init__(self, session: Session, names: list[str],
                 sets: Sequence[CalibrationSet]) -> None:
        self.session, self.names = session, list(dict.fromkeys(names))
        first = sets[0].chunks[0]
        _, values = next(session.runs(sets[0], self.names, dense=True))
        self.per_sample = {k: 2 * v.nbytes / (first.stop - first.start)
                           for k, v in values.items()}
        # Per sample of every set together: each set's window then fits beside the others'.
        self.limit = TEACHER_CACHE_BYTES / sum(data.n for data in sets)
        self.sets = {id(data) for data in sets}
        #: {set id: (the names captured, their values chunk by chunk)}
        self.cache: dict[int, tuple[set[str], list[dict[str, np.ndarray]]]] = {}

    def window(self, data: CalibrationSet, names: list[str]) -> list[str] | None:
        """The points to capture for a request of ``names``: from the earliest of them on in
        graph order while they fit ``data``'s share of the limit; None where ``names`` do not."""
        if not set(names) <= set(self.names) or id(data) not in self.sets:
            return None
        start = min(self.names.index(n) for n in names)
        taken, size = [], 0.0
        for name in self.names[start:]:
            size += self.per_sample[name]
            if size > self.limit:
                break
            taken.append(name)
        return taken if set(names) <= set(taken) else None

    def runs(self, data: CalibrationSet, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """{name: dense value} of (at least) ``names``, one chunk of ``data`` at a time."""
        cached = self.cache.get(id(data))
        if cached is None or not set(names) <= cached[0]:
            self.cache.pop(id(data), None)
            taken = self.window(data, names)
            if taken is None:
                return (v for _, v in self.session.runs(data, names, dense=True))
            self.cache[id(data)] = (set(taken), [v for _, v in self.session.runs(
                data, taken, dense=True)])
        return iter(self.cache[id(data)][1])


def relative_error(session: Session, data: CalibrationSet, output: str, dense: Teacher,
                    fitted: bool) -> float:
    """Squared error of the pruned model's ``output`` (with the fits or without) to the dense
    model's, relative to the dense output's squared norm (real tokens only for per-token
    outputs)."""
    err = norm = 0.0
    for (mask, got), want in zip(session.runs(data, [output], fitted=fitted),
                                 dense.runs(data, [output])):
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
