"""The rank-k scorer: exact trajectory scores for blocks with one consumer (heads, MLP neurons).

Three exact cuts make it fast. (1) Prefix reuse: only the suffix downstream of the unit's block
runs, from cached dense activations (:mod:`optin_onnx.scoring.suffix`). (2) Rank-k updates:
removing unit j changes its consumer's output by exactly ``-X[..., C_j] @ W[C_j, :]`` (C_j: the
unit's channels, one for a neuron, head_dim for a head), so the suffix starts from that updated
tensor instead of rerunning the consumer. (3) Candidate batching: several candidates are stacked
along the measured batch axis of every suffix input, one run for all of them.

A block with several consumers (a conv channel group read by every conv on a residual stream) has
no single output to update: :func:`score_rank_k` refuses it, and the caller picks
:func:`~optin_onnx.scoring.masked.score_masked` instead (``trajectory.fast_scorer``).
"""
from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet, batch_axes, capture
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.instrument import channel_mask, masked_model, oriented, unit_masks
from optin_onnx.runtime import session
from optin_onnx.scoring.candidates import candidate_sets, channel_proxy, spread
from optin_onnx.scoring.suffix import build_suffix, value_dtypes
from optin_onnx.scoring.teacher import Objective, anchor
from optin_onnx.scoring.types import Captured, Progress, ScoreConfig, Scores, Units


def _split(arr: np.ndarray, n: int, axis: int | None) -> list[np.ndarray]:
    """``n`` candidates' parts of a stacked value (a batch-free value is shared by all)."""
    if axis is None:
        return [arr] * n
    return np.split(arr, n, axis=axis)


def _tile(arr: np.ndarray, n: int, axis: int | None) -> np.ndarray:
    """A dense value repeated for ``n`` stacked candidates along its batch axis."""
    return arr if axis is None or n == 1 else np.concatenate([arr] * n, axis=axis)


def score_rank_k(model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                 only: Units | None = None, base: Units | None = None) -> Scores:
    """Exact trajectory scores with prefix reuse, rank-k updates and candidate batching.
    ``only`` and ``base`` as in :func:`~optin_onnx.scoring.trajectory.score_fast`."""
    shared = next((b for b in structure.blocks if len(b.consumers) != 1), None)
    if shared is not None:
        raise OptinError(f"{shared.name} has {len(shared.consumers)} consumers; the rank-k scorer "
                         f"needs one (score_masked scores any block)")
    t0 = time.perf_counter()
    teacher_proto = ir.to_proto(model)
    # The base masks as constant Muls before the consumers: each consumer's data input is then
    # the masked activation, so the rank-k update of a dropped unit is zero by construction.
    base_model = model if base is None else masked_model(model, structure,
                                                         unit_masks(structure, base))
    proto = ir.to_proto(base_model)
    nodes = nodes_by_name(base_model.graph)
    obj = Objective(model, structure, cal, cfg)
    dtypes = value_dtypes(proto, cal)
    plans = []
    for b in structure.blocks:
        c = b.consumers[0]
        node = nodes[c.node]
        weight = const_array(node.inputs[c.weight_index])
        w = oriented(weight, c)
        suffix = build_suffix(proto, node.outputs[0].name, obj.wanted(b), dtypes)
        plans.append((b, c, node.inputs[c.data_index].name, node.outputs[0].name, w, suffix))
    needed = {obj.output, *obj.all_features()}
    for _, _, x, y, _, sfx in plans:
        needed.update([x, y, *sfx.cut])
    needed -= set(cal.feeds)
    dense = capture(proto, cal, sorted(needed), cfg.providers)
    base_loss = anchor(obj, model, structure, cfg, base, dense,
                       lambda: capture(teacher_proto, cal, obj.wanted_all(), cfg.providers))
    axes = batch_axes(proto, cal, sorted(needed | set(cal.feeds)))
    md_of: dict[str, np.ndarray] = {}
    kd_of: dict[str, np.ndarray] = {}
    per_run = max(1, cfg.candidates_per_run)
    for b, c, x_name, y_name, w, sfx in plans:
        proxy = channel_proxy(b, nodes, dense) if b.kind == "mlp" else None
        sets = candidate_sets(b, cfg.neuron_group, proxy,
                              None if only is None else only.get(b.name, []),
                              None if base is None else base.get(b.name, range(b.n_units)))
        sess = session(sfx.model, cfg.providers, outputs=sfx.outputs)
        md, kd = np.zeros(len(sets)), np.zeros(len(sets))
        for first in range(0, len(sets), per_run):
            batch = sets[first:first + per_run]
            n = len(batch)
            student: list[Captured] = [[] for _ in batch]
            for chunk, values in zip(cal.chunks, dense):
                x, y = values[x_name], values[y_name]
                ys = []
                for units in batch:
                    keep = np.ones(b.n_units)
                    keep[units] = 0
                    ch = np.flatnonzero(channel_mask(b, keep, c.role, c.group) == 0)
                    ys.append(y - np.take(x, ch, axis=c.data_axis) @ w[ch])
                feeds = {sfx.start: np.concatenate(ys, axis=axes[y_name] or 0).astype(y.dtype)}
                for name in sfx.cut:
                    feeds[name] = _tile(values[name], n, axes[name])
                for name in sfx.graph_inputs:
                    feeds[name] = _tile(chunk.feeds[name], n, axes[name])
                outs = dict(zip(sfx.outputs, sess.run(sfx.outputs, feeds)))
                split = {k: _split(v, n, axes[k]) for k, v in outs.items()}
                for i in range(n):
                    student[i].append({k: v[i] for k, v in split.items()})
            for i in range(n):
                md[first + i], kd[first + i] = np.subtract(obj.loss(b, student[i]),
                                                           base_loss[b.name])
            if progress:
                progress(sum(len(u) for u in batch))
        md_of[b.name] = spread(md, sets, proxy, b.n_units)
        kd_of[b.name] = spread(kd, sets, proxy, b.n_units)
    return Scores(md=md_of, kd=kd_of, seconds=time.perf_counter() - t0).finalize(cfg.lam)
