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
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Structure
from optin_onnx.calibrate import CalibrationSet, batch_axes, capture, check_cache_fits
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.instrument import channel_mask, masked_model, oriented, unit_masks
from optin_onnx.scoring.candidates import candidate_sets, input_squares, proxy_from_squares
from optin_onnx.scoring.executors import (Result, SuffixJob, Task, gather, holders,
                                          run_tasks)
from optin_onnx.scoring.suffix import BlockValues, SuffixSessions, suffix_cut, value_dtypes
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


@dataclass
class _Plan:
    """One block's rank-k update: its consumer, the consumer's input and output, the oriented
    weight, and the values a candidate run returns."""

    block: Block
    consumer: Consumer
    x: str
    y: str
    w: np.ndarray
    outputs: list[str]


@dataclass
class RankKJob(SuffixJob):
    """What a rank-k task reads (sent once to each worker; see
    :mod:`~optin_onnx.scoring.executors`): the base model's suffixes, the cached dense values
    the suffixes read, each block's consumer input and output (computed where the block's tasks
    run), the measured batch axes and the teacher side of the loss."""

    plans: list[_Plan]
    axes: dict[str, int | None]
    local: BlockValues  # each block's consumer input and output, one block at a time

    def run(self, task: Task, threads: int | None) -> Result:
        """L_MD and L_KD (one per objective output) added to the base loss, per candidate set
        of ``task``, in one stacked suffix run per calibration chunk."""
        index, batch = task
        p = self.plans[index]
        b, c, w = p.block, p.consumer, p.w
        sfx, sess = self.suffixes.open(p.y, p.outputs, threads)
        n, axes = len(batch), self.axes
        student: list[Captured] = [[] for _ in batch]
        ahead = self.plans[index + 1] if index + 1 < len(self.plans) else p
        for chunk, values, own in zip(self.cal.chunks, self.dense,
                                      self.local.get((p.x, p.y), threads, (ahead.x, ahead.y))):
            x, y = own[p.x], own[p.y]
            ys = []
            for units in batch:
                keep = np.ones(b.n_units)
                keep[units] = 0
                ch = np.flatnonzero(channel_mask(b, keep, c.role, c.group) == 0)
                ys.append(y - np.take(x, ch, axis=c.data_axis) @ w[ch])
            feeds = {sfx.start: np.concatenate(ys, axis=axes[p.y] or 0).astype(y.dtype)}
            for name in sfx.cut:
                feeds[name] = _tile(values[name], n, axes[name])
            for name in sfx.graph_inputs:
                feeds[name] = _tile(chunk.feeds[name], n, axes[name])
            outs = dict(zip(sfx.outputs, sess.run(sfx.outputs, feeds)))
            split = {k: _split(v, n, axes[k]) for k, v in outs.items()}
            for i in range(n):
                student[i].append({k: v[i] for k, v in split.items()})
        losses = np.array([self.obj.loss(b, s) - self.base_loss[b.name] for s in student])
        return losses[:, 0], losses[:, 1:]


def score_rank_k(model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                 only: Units | None = None, base: Units | None = None) -> Scores:
    """Exact trajectory scores with prefix reuse, rank-k updates and candidate batching.
    ``only`` and ``base`` as in :func:`~optin_onnx.scoring.trajectory.score_fast`; the
    candidate batches run where ``cfg.executor`` says."""
    shared = next((b for b in structure.blocks if len(b.consumers) != 1), None)
    if shared is not None:
        raise OptinError(f"{shared.name} has {len(shared.consumers)} consumers; the rank-k scorer "
                         f"needs one (score_masked scores any block)")
    t0 = time.perf_counter()
    # The base masks as constant Muls before the consumers: each consumer's data input is then
    # the masked activation, so the rank-k update of a dropped unit is zero by construction.
    base_model = model if base is None else masked_model(model, structure,
                                                         unit_masks(structure, base))
    proto = ir.to_proto(base_model)
    nodes = nodes_by_name(base_model.graph)
    obj = Objective(model, structure, cal, cfg)
    dtypes = value_dtypes(proto, cal)
    plans = []
    # Cached for the whole set: what the teacher side and the suffixes read. Each block's
    # consumer input and output are not (BlockValues computes them block by block), only seen
    # chunk by chunk here for the neuron proxies.
    needed = {*obj.outputs, *obj.all_features()}
    for b in structure.blocks:
        c = b.consumers[0]
        node = nodes[c.node]
        plan = _Plan(b, c, node.inputs[c.data_index].name, node.outputs[0].name,
                     oriented(const_array(node.inputs[c.weight_index]), c), obj.wanted(b))
        plans.append(plan)
        needed.update(suffix_cut(proto, plan.y, plan.outputs, dtypes))
    needed -= set(cal.feeds)
    local = {v for p in plans for v in (p.x, p.y)} - needed - set(cal.feeds)
    widest = max(plans, key=lambda p: p.w.shape[0])
    check_cache_fits(proto, cal, sorted(needed | {widest.x, widest.y}), cfg.max_memory_bytes,
                     holders(cfg.executor))
    squares: dict[str, list[np.ndarray]] = {}

    def add_squares(values: dict[str, np.ndarray]) -> None:
        for p in plans:
            if p.block.kind == "mlp":
                got = input_squares(p.block, nodes, [values])
                old = squares.get(p.block.name)
                squares[p.block.name] = got if old is None else [a + b for a, b in zip(old, got)]

    dense = capture(proto, cal, sorted(needed | local), cfg.providers, keep=needed,
                    each=add_squares)
    base_loss = anchor(obj, model, structure, cfg, base, dense,
                       # the dense teacher's proto only when asked for (rounds, dense
                       # teacher): a model's worth of memory otherwise held all through scoring
                       lambda: capture(ir.to_proto(model), cal, obj.wanted_all(), cfg.providers))
    axes = batch_axes(proto, cal, sorted(needed | local | set(cal.feeds)))
    per_run = max(1, cfg.candidates_per_run)
    tasks: list[Task] = []
    sets_of, proxies = {}, {}
    for i, p in enumerate(plans):
        b = p.block
        proxies[b.name] = (proxy_from_squares(b, nodes, squares[b.name]) if b.kind == "mlp"
                           else None)
        sets_of[b.name] = candidate_sets(b, cfg.neuron_group, proxies[b.name],
                                         None if only is None else only.get(b.name, []),
                                         None if base is None else base.get(b.name,
                                                                            range(b.n_units)))
        sets = sets_of[b.name]
        tasks.extend((i, sets[first:first + per_run]) for first in range(0, len(sets), per_run))
    job = RankKJob(SuffixSessions(proto, dtypes, cfg.providers), cal, dense, obj, base_loss,
                   plans, axes, BlockValues(proto, cal, cfg.providers))
    return gather(structure, tasks, run_tasks(job, tasks, cfg.executor, progress), sets_of,
                  proxies, t0, cfg.lam, len(obj.outputs))
