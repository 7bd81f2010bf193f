"""Convolutional ops on axis 1 of NCHW maps: Conv (consumer, or depthwise: keeps the axis),
BatchNormalization, pooling, Pad and reductions over other axes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
import numpy as np

from optin_onnx.analysis.groups import Track
from optin_onnx.analysis.structure import AttrEdit, Consumer, ParamSlice, Role, ShapeEdit
from optin_onnx.graph import attr, const_array

if TYPE_CHECKING:
    from optin_onnx.analysis.propagate import Propagator

def _spatial_only(p: Propagator, node: ir.Node, t: Track) -> bool:
    """Conv-like ops keep batch and channel axes (0, 1) and mix spatial ones: a tracked spatial
    axis is a barrier. True when the op may proceed."""
    bad = [gid for a, (gid, _) in t.items() if a >= 2]
    for gid in bad:
        p.barrier(gid, f"{node.op_type} '{node.name}' mixes the axis spatially")
    return not bad


def conv(p: Propagator, node: ir.Node) -> None:
    """Group-1 Conv: a consumer of its input channels (weight axis 1). Depthwise Conv (one filter
    per channel): the output channel axis is the input's, and weight, bias and ``group`` shrink with
    it. Other grouped convs tie channels in blocks of C/group: a barrier."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"Conv '{node.name}' takes the axis as a weight or bias")
    if not _spatial_only(p, node, t) or 1 not in t:
        return
    gid, role = t[1]
    w = const_array(node.inputs[1])
    group = attr(node, "group", 1)
    if w is None:
        return p.barrier(gid, f"Conv '{node.name}' has a run-time weight")
    g = p.group(gid)
    if group == 1:
        g.consumers.append(Consumer(node.name, 0, 1, 1, 1, role,
                                    trailing=len(p.shape(node.inputs[0])) - 2))
        p.mac_axes.append((node.name, gid, "in"))
        g.slices.append(ParamSlice(node.name, 1, 1, role))
        return
    channels = p.shape(node.inputs[0])[1]
    if group != channels or w.shape[0] != channels or w.shape[1] != 1:
        return p.barrier(gid, f"grouped Conv '{node.name}' (group={group}, {channels} channels in, "
                            f"{w.shape[0]} out) ties channels in blocks")
    g.slices.append(ParamSlice(node.name, 1, 0, role))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if const_array(node.inputs[2]) is None:
            return p.barrier(gid, f"Conv '{node.name}' has a run-time bias")
        g.slices.append(ParamSlice(node.name, 2, 0, role))
    g.attr_edits.append(AttrEdit(node.name, "group", Role.FLAT))
    p.tracks[node.outputs[0].name] = {1: (gid, role)}


def batch_norm(p: Propagator, node: ir.Node) -> None:
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"BatchNormalization '{node.name}' takes the axis as a parameter")
    if len([o for o in node.outputs if o is not None and o.uses()]) > 1:
        return p.barrier_all(t, f"BatchNormalization '{node.name}' in training mode")
    if not _spatial_only(p, node, t) or 1 not in t:
        return
    gid, role = t[1]
    for i in range(1, 5):
        if const_array(node.inputs[i]) is None:
            return p.barrier(gid, f"BatchNormalization '{node.name}' has run-time statistics")
        p.group(gid).slices.append(ParamSlice(node.name, i, 0, role))
    p.tracks[node.outputs[0].name] = dict(t)


def pool(p: Propagator, node: ir.Node) -> None:
    """Pooling works per channel; MaxPool's optional indices output encodes channel positions."""
    t = p.track(node.inputs[0])
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        return p.barrier_all(t, f"{node.op_type} '{node.name}' returns indices")
    if _spatial_only(p, node, t):
        p.tracks[node.outputs[0].name] = dict(t)


def resize(p: Propagator, node: ir.Node) -> None:
    """``Resize`` / ``Upsample`` (a SegFormer or FPN decoder upsampling each feature map) works on
    each channel alone: a tracked axis passes where it is not resized. Its ``scales`` entry must be
    1, or its ``sizes`` entry a constant that holds the axis' size (the rewrite edits it to the
    kept size); a run-time ``sizes`` covering the axis is a barrier, as is cropping by ``roi``."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"{node.op_type} '{node.name}' takes the axis as a parameter")
    if not t:
        return
    rank = len(p.shape(node.inputs[0]))
    slot = {"Resize": (2, 3), "Upsample": (1, None)}[node.op_type]
    scales_v, sizes_v = (node.inputs[i] if i is not None and i < len(node.inputs) else None
                         for i in slot)
    axes = attr(node, "axes", None)
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    given = [v for v in (scales_v, sizes_v) if v is not None and (p.shape(v) or (0,))[0] > 0]
    crop = attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    values = p.static(given[0]) if len(given) == 1 else None
    for a, (gid, role) in t.items():
        if a not in axes or role is Role.INNER:
            continue
        why = None
        if crop:
            why = "crops by roi"
        elif values is None:
            why = "has run-time or missing scales and sizes"
        elif given[0] is scales_v and float(np.reshape(values, -1)[axes.index(a)]) != 1.0:
            why = "resizes the axis"
        elif given[0] is sizes_v:
            size = int(np.reshape(values, -1)[axes.index(a)])
            if const_array(sizes_v) is None or size != p.shape(node.inputs[0])[a]:
                why = "has run-time sizes for the axis" if size == p.shape(node.inputs[0])[a] \
                    else "resizes the axis"
            else:
                p.group(gid).shape_edits.append(ShapeEdit(node.name, (3,), axes.index(a), role,
                                                          group=p.group_of(node.inputs[0], a)))
        if why is not None:  # every group on the input stops here, not only this one
            return p.barrier_all(t, f"{node.op_type} '{node.name}' {why}")
    p.tracks[node.outputs[0].name] = dict(t)


def pad(p: Propagator, node: ir.Node) -> None:
    """Padding of other axes keeps the channel axis; padding the channel axis is a barrier."""
    t = p.track(node.inputs[0])
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"Pad '{node.name}' takes the axis as a parameter")
    rank = len(p.shape(node.inputs[0]))
    pads = p.static(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "pads", None)
    axes = p.static(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None \
        else None
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        return p.barrier_all(t, f"Pad '{node.name}' has run-time pads")
    pads = np.reshape(pads, -1)
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.reshape(axes, -1)]
    padded = {a for i, a in enumerate(axes) if pads[i] != 0 or pads[i + len(axes)] != 0}
    for a, (gid, _) in t.items():
        if a in padded:
            return p.barrier(gid, f"Pad '{node.name}' pads the axis")
    p.tracks[node.outputs[0].name] = dict(t)


def reduce(p: Propagator, node: ir.Node) -> None:
    """A reduction over other axes (the squeeze-excite ``mean`` over H, W) keeps the axis."""
    t = p.track(node.inputs[0])
    rank = len(p.shape(node.inputs[0]))
    for v in node.inputs[1:]:
        p.barrier_all(p.track(v), f"{node.op_type} '{node.name}' takes the axis as a parameter")
    axes = p.static(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
        else attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        return p.barrier_all(t, f"{node.op_type} '{node.name}' has run-time axes")
    if axes is None or np.size(axes) == 0:
        reduced = set() if attr(node, "noop_with_empty_axes", 0) else set(range(rank))
    else:
        reduced = {int(a) % rank for a in np.reshape(axes, -1)}
    for a, (gid, _) in t.items():
        if a in reduced:
            return p.barrier(gid, f"{node.op_type} '{node.name}' reduces over the axis")
    keep = attr(node, "keepdims", 1)
    kept = [a for a in range(rank) if keep or a not in reduced]
    p.tracks[node.outputs[0].name] = {kept.index(a): v for a, v in t.items()}
