"""Undo projection fusion before the analysis: one MatMul whose output channels are cut into
several projections becomes one MatMul per projection.

Exporters and onnxsim write Q, K and V (or an MLP's gate and up) as one product with the weights
concatenated, then cut the output channels apart. Each part is a projection of its own, with its
own heads or neurons; the analysis follows a channel axis per weight, and a fused axis would mix
several groups. The forms found in real exports, all matched here:

    x --MatMul(W)----------------------------------Split(axis=-1)------> q, k, v   onnxsim, dynamo
    x --MatMul(W)--+--Slice([0:64], axes=-1)---> q                                  Phi-3 qkv_proj
                   +--Slice([64:96], axes=-1)--> k
                   +--Slice([96:MAX], axes=-1)-> v
    x --MatMul(W)--Add(b)--------------------------Split | Slices--------> ...     Linear + bias
    x --Gemm(W, b)--Reshape([B*S, N] -> [B, S, N])--Split(axis=2)--------> q, k, v  GPT-2 Conv1D
    x --MatMul(W)--Reshape([B, S, N] -> [B, S, 3, H, D])--Split(axis=-3) | Slices(axes=-3)
                                                  --Squeeze(-3)--------> q, k, v    ModernBERT Wqkv

Each part becomes ``x --MatMul(W[:, lo:hi])--Add(b[lo:hi])--Reshape(target')-->`` the value the
window (or its Squeeze) produced: the same numbers, as the columns of one product are the
product with those columns. A window left unused by the graph gets no part. Slice bounds that
the exporter computes from the width at run time (``torch.chunk``) are folded to constants first
(:mod:`~optin_onnx.passes.fold_slice_bounds`).

A Reshape between the product and the windows is rewritten only when it provably keeps the fused
axis whole: the target's elements from the windowed axis on multiply to the fused width, either
as constants or because the dimensions before it are those of the product (static shapes, see
:mod:`~optin_onnx.passes._shapes`). Each part's Reshape gets the original target with the windowed
element set to the window's length, or removed where a Squeeze drops that axis; a ``-1``
elsewhere stays (it resolves to the same size, the total shrinking with the removed element). The
windowed element must sit in a constant: the target itself, or one constant piece of a Concat.
Anything not proved is left as it is (the analysis then says why it stops there).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optin_onnx.graph import attr, const_array
from optin_onnx.passes._shapes import Shapes, static_shapes
from optin_onnx.passes.fold_slice_bounds import fold_slice_bounds

_DEFAULT = ("", "ai.onnx")


@dataclass
class _Projection:
    """A product with a constant weight: ``node`` (MatMul or Gemm), its weight as [in, out], its
    bias over the outputs (a Gemm's C or a following Add's constant) and the value it yields."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    output: ir.Value


@dataclass
class _Window:
    """Elements ``[start, end)`` of the windowed axis; ``value`` is what the part replaces (the
    window, or the Squeeze that drops its axis, then ``squeezed``)."""

    start: int
    end: int
    value: ir.Value
    squeezed: bool


def _projection(node: ir.Node) -> _Projection | None:
    """``node`` as a projection with a 2-D constant weight, or None."""
    if node.domain not in _DEFAULT:
        return None
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        # alpha, beta and transB stay on each part (scaling the slices instead would round
        # differently); only the weight's orientation is undone here.
        if attr(node, "transA", 0):
            return None
        weight = weight.T if attr(node, "transB", 0) else weight
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and (
                bias is None or bias.size != weight.shape[1]):
            return None
        return _Projection(node, weight, None if bias is None else bias.reshape(-1),
                           node.outputs[0])
    if node.op_type != "MatMul":
        return None
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output():
        add = uses[0].node
        bias = const_array(add.inputs[1 - uses[0].idx]) if add.op_type == "Add" and \
            add.domain in _DEFAULT else None
        if bias is not None and bias.ndim == 1 and bias.size == weight.shape[1]:
            return _Projection(node, weight, bias, add.outputs[0])
    return _Projection(node, weight, None, out)


def _axis(axis: int, rank: int | None) -> int | None:
    """``axis`` counted from the end (-1 = last), or None when the rank is needed and unknown."""
    if axis < 0:
        return axis
    return None if rank is None else axis - rank


def _split_sizes(split: ir.Node, length: int) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const_array(split.inputs[1])
        return None if sizes is None else [int(s) for s in np.reshape(sizes, -1)]
    if attr(split, "split") is not None:
        return [int(s) for s in attr(split, "split")]
    n = attr(split, "num_outputs", len(split.outputs))
    if length % n:
        return None
    return [length // n] * n


def _slice_window(node: ir.Node, rank: int | None, length: int) -> tuple[int, int, int] | None:
    """(axis from the end, start, end) of a Slice with constant bounds and unit step on one
    axis, clamped as ONNX clamps them; None otherwise."""
    if len(node.inputs) < 3:
        return None  # opset < 10: bounds as attributes, not written by today's exporters
    parts = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    starts, ends = parts[0], parts[1]
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    axes = parts[2] if len(parts) > 2 and node.inputs[3] is not None else np.zeros(1, np.int64)
    steps = parts[3] if len(parts) > 3 and node.inputs[4] is not None else np.ones(1, np.int64)
    if axes is None or steps is None or axes.size != 1 or int(steps.reshape(-1)[0]) != 1:
        return None
    axis = _axis(int(axes.reshape(-1)[0]), rank)
    lo, hi = (int(b.reshape(-1)[0]) for b in (starts, ends))
    lo, hi = (min(max(b + length if b < 0 else b, 0), length) for b in (lo, hi))
    return None if axis is None or hi <= lo else (axis, lo, hi)


def _squeeze_of(value: ir.Value, axis: int, rank: int | None) -> ir.Value | None:
    """The output of the one Squeeze that drops ``axis`` (from the end) of ``value``."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Squeeze" or node.domain not in _DEFAULT:
        return None
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes")
    if axes is None or np.size(axes) != 1 or node.outputs[0].is_graph_output():
        return None
    return node.outputs[0] if _axis(int(np.reshape(axes, -1)[0]), rank) == axis else None


def _windows(value: ir.Value, rank: int | None, length_at: Callable[[int], int | None],
             squeeze: bool) -> tuple[int, list[_Window]] | None:
    """The axis (from the end) that every use of ``value`` cuts and the disjoint windows, or None.

    ``length_at(axis)`` gives that axis's length (None if unknown). With ``squeeze`` (the parts
    are reshaped, so a part can leave the axis out), a window of length 1 followed by a Squeeze of
    its axis (``unbind``) is marked squeezed when all of them are.
    """
    if value.is_graph_output() or not value.uses():
        return None
    found: list[tuple[int, int, int, ir.Value]] = []
    for use in value.uses():
        node = use.node
        if use.idx != 0 or node.domain not in _DEFAULT or \
                any(o.is_graph_output() for o in node.outputs):
            return None
        if node.op_type == "Split":
            axis = _axis(attr(node, "axis", 0), rank)
            length = None if axis is None else length_at(axis)
            sizes = None if length is None else _split_sizes(node, length)
            if sizes is None or sum(sizes) != length or len(sizes) != len(node.outputs):
                return None
            starts = np.cumsum([0, *sizes])
            found += [(axis, int(starts[i]), int(starts[i + 1]), o)
                      for i, o in enumerate(node.outputs) if o.uses()]
        elif node.op_type == "Slice":
            axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and \
                node.inputs[3] is not None else np.zeros(1, np.int64)
            axis = None if axes is None or axes.size != 1 else \
                _axis(int(axes.reshape(-1)[0]), rank)
            length = None if axis is None else length_at(axis)
            window = None if length is None else _slice_window(node, rank, length)
            if window is None:
                return None
            found.append((*window, node.outputs[0]))
        else:
            return None
    if len({f[0] for f in found}) != 1:
        return None
    axis = found[0][0]
    spans = sorted((lo, hi) for _, lo, hi, _ in found)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None  # overlapping windows: one channel in two projections
    squeezes = [_squeeze_of(v, axis, rank) if squeeze and hi - lo == 1 else None
                for _, lo, hi, v in found]
    if squeeze and all(s is not None for s in squeezes):
        return axis, [_Window(lo, hi, s, True) for (_, lo, hi, _), s in zip(found, squeezes)]
    return axis, [_Window(lo, hi, v, False) for _, lo, hi, v in found]


@dataclass
class _Target:
    """A Reshape target's elements (None where computed at run time) and, per element, the
    constant that holds it: (Concat input slot or None for a constant target, offset)."""

    value: ir.Value
    elements: list[int | None]
    holders: list[tuple[int | None, int] | None]


def _target(value: ir.Value, shapes: Shapes) -> _Target | None:
    const = const_array(value)
    if const is not None:
        flat = [int(e) for e in np.reshape(const, -1)]
        return _Target(value, flat, [(None, i) for i in range(len(flat))])
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in _DEFAULT:
        return None
    elements: list[int | None] = []
    holders: list[tuple[int | None, int] | None] = []
    for slot, piece in enumerate(node.inputs):
        arr = const_array(piece)
        if arr is not None:
            elements += [int(e) for e in np.reshape(arr, -1)]
            holders += [(slot, i) for i in range(arr.size)]
            continue
        shape = shapes.get(piece.name)
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        elements += [None] * shape[0]
        holders += [None] * shape[0]
    return _Target(value, elements, holders)


def _edit_target(target: _Target, index: int, new: int | None, name: str,
                 model: ir.Model, before: ir.Node) -> ir.Value:
    """``target`` with element ``index`` (held by a constant) set to ``new`` (removed if None), as
    a new constant or a new Concat inserted before ``before``."""
    slot, offset = target.holders[index]

    def edited(arr: np.ndarray) -> ir.Value:
        flat = np.array(np.reshape(arr, -1), dtype=np.int64)
        flat = np.delete(flat, offset) if new is None else \
            np.concatenate([flat[:offset], [new], flat[offset + 1:]]).astype(np.int64)
        v = ir.Value(name=f"{name}_shape", const_value=ir.tensor(flat, name=f"{name}_shape"))
        model.graph.register_initializer(v)
        return v

    if slot is None:
        return edited(const_array(target.value))
    concat = target.value.producer()
    pieces = list(concat.inputs)
    pieces[slot] = edited(const_array(pieces[slot]))
    node = ir.Node("", "Concat", [p for p in pieces if p.const_value is None or p.const_value.size],
                   attributes=[ir.AttrInt64("axis", 0)], name=f"{name}_shape_concat")
    node.outputs[0].name = f"{name}_shape_concat_out"
    model.graph.insert_before(before, node)
    return node.outputs[0]


def _reshape_plan(reshape: ir.Node, proj: _Projection, shapes: Shapes, axis: int
                  ) -> tuple[_Target, int, int] | None:
    """For a Reshape between the product and windows on ``axis`` (from the end) of its output:
    (its target, the windowed element's index, that axis's length), when the elements from the
    windowed one on provably split the fused width and nothing else; None otherwise."""
    target = _target(reshape.inputs[1], shapes)
    width = proj.weight.shape[1]
    in_shape = shapes.get(proj.output.name)
    if target is None or in_shape is None or not -len(target.elements) <= axis < 0:
        return None
    index = len(target.elements) + axis
    if target.holders[index] is None:
        return None  # the windowed element is computed at run time: no part's can be written
    trailing = target.elements[index:]
    copies = not attr(reshape, "allowzero", 0)
    if copies and any(e == 0 for e in target.elements[len(in_shape) - 1:]):
        return None  # a 0 there would copy the fused width, which each part changes
    if all(e is not None and e > 0 for e in trailing):
        if math.prod(trailing) != width:
            return None
    else:
        # A -1 or run-time element among them: the dimensions before the windowed axis must be
        # the product's own, so that what follows multiplies to the fused width.
        out_shape = shapes.get(reshape.outputs[0].name)
        lead_in = in_shape[:-1]
        if out_shape is None or len(out_shape) != len(target.elements) or \
                index != len(lead_in) or any(d is None for d in lead_in) or \
                tuple(out_shape[:index]) != tuple(lead_in):
            return None
    length = target.elements[index]
    if length is None or length <= 0:
        others = trailing[1:]
        if not all(e is not None and e > 0 for e in others) or width % math.prod(others):
            return None
        length = width // math.prod(others)
    if width % length:
        return None
    return target, index, length


def _rewrite(model: ir.Model, proj: _Projection, shapes: Shapes) -> bool:
    """Split ``proj`` into one projection per window of its output, if every condition holds."""
    width = proj.weight.shape[1]
    out, reshape = proj.output, None
    uses = out.uses()
    if len(uses) == 1 and uses[0].idx == 0 and uses[0].node.op_type == "Reshape" and \
            uses[0].node.domain in _DEFAULT and not out.is_graph_output():
        reshape = uses[0].node
        target = _target(reshape.inputs[1], shapes)
        if target is None:
            return False
        rank, cut = len(target.elements), reshape.outputs[0]
        plans: dict[int, tuple[_Target, int, int] | None] = {}

        def length_at(axis: int) -> int | None:
            if axis not in plans:
                plans[axis] = _reshape_plan(reshape, proj, shapes, axis)
            return None if plans[axis] is None else plans[axis][2]
    else:
        shape = shapes.get(out.name)
        rank, cut = (None if shape is None else len(shape)), out

        def length_at(axis: int) -> int | None:
            return width if axis == -1 else None
    found = _windows(cut, rank, length_at, squeeze=reshape is not None)
    if found is None:
        return False
    axis, windows = found
    step = width // length_at(axis)
    node = proj.node
    parts: list[tuple[ir.Value, ir.Value]] = []
    for i, w in enumerate(windows):
        name = f"{node.name}__part{i}"
        lo, hi = w.start * step, w.end * step
        if reshape is None:
            anchor = w.value.producer()
        else:
            anchor = reshape
            plan = plans[axis]
            shape = _edit_target(plan[0], plan[1], None if w.squeezed else w.end - w.start,
                                 name, model, anchor)
        part = _part(model, proj, lo, hi, name, anchor)
        if reshape is not None:
            r = ir.Node("", "Reshape", [part, shape], attributes=_copied_attributes(reshape),
                        name=f"{name}_reshape")
            r.outputs[0].name = f"{name}_reshaped"
            model.graph.insert_before(anchor, r)
            part = r.outputs[0]
        parts.append((w.value, part))
    for old, new in parts:
        ir.convenience.replace_all_uses_with(old, new)
    return True


def _copied_attributes(node: ir.Node) -> list[ir.Attr]:
    return [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]


def _part(model: ir.Model, proj: _Projection, lo: int, hi: int, name: str,
          before: ir.Node) -> ir.Value:
    """``x @ W[:, lo:hi] (+ b[lo:hi])`` as new nodes inserted before ``before``."""
    node = proj.node

    def initializer(arr: np.ndarray, suffix: str) -> ir.Value:
        v = ir.Value(name=f"{name}_{suffix}",
                     const_value=ir.tensor(np.ascontiguousarray(arr), name=f"{name}_{suffix}"))
        model.graph.register_initializer(v)
        return v

    cols = proj.weight[:, lo:hi]
    bias = None if proj.bias is None else initializer(proj.bias[lo:hi], "bias")
    if node.op_type == "Gemm":
        weight = initializer(cols.T if attr(node, "transB", 0) else cols, "weight")
        inputs = [node.inputs[0], weight] + ([bias] if bias is not None else [])
        nodes = [ir.Node("", "Gemm", inputs, attributes=_copied_attributes(node), name=name)]
    else:
        nodes = [ir.Node("", "MatMul", [node.inputs[0], initializer(cols, "weight")],
                         name=name)]
        if bias is not None:
            nodes.append(ir.Node("", "Add", [nodes[0].outputs[0], bias], name=f"{name}_bias"))
    for n in nodes:
        n.outputs[0].name = f"{n.name}_out"
        model.graph.insert_before(before, n)
    return nodes[-1].outputs[0]


def split_fused_projections(model: ir.Model) -> int:
    """Rewrite every fused projection (see the module docstring) into one per window (in place).

    Returns the number of fused products undone.
    """
    shapes = static_shapes(model)
    fold_slice_bounds(model, shapes)
    count = 0
    for node in list(model.graph):
        proj = _projection(node)
        if proj is not None and _rewrite(model, proj, shapes):
            count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count
