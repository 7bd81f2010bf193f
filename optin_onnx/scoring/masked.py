"""The masked-suffix scorer, for blocks with many consumers (conv channel groups).

A conv channel group is read by every conv on its residual stream, so there is no single output
to apply a rank-k update to (:mod:`optin_onnx.scoring.fast`). This scorer works on the masked
model instead (a mask input per block, :func:`~optin_onnx.instrument.masked_model`): per block it
runs only the part downstream of the block's mask input, fed the cached values of the dense run
(or of the base selection), one candidate per run. It is exact, and it is the scorer
``trajectory.fast_scorer`` picks whenever the structure has channel groups.

:class:`MaskedModel` and :func:`score_one_by_one` also serve the naive reference scorer.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Structure
from optin_onnx.calibrate import CalibrationSet, capture, check_cache_fits
from optin_onnx.graph import nodes_by_name
from optin_onnx.instrument import channel_mask, mask_input_name, masked_model, unit_masks
from optin_onnx.scoring.candidates import candidate_sets, channel_proxy, spread
from optin_onnx.scoring.executors import (Result, SuffixJob, Task, gather, holders,
                                          run_tasks)
from optin_onnx.scoring.features import feature_kind
from optin_onnx.scoring.liveness import block_points
from optin_onnx.scoring.suffix import SuffixSessions, suffix_cut, value_dtypes
from optin_onnx.scoring.teacher import Objective, anchor
from optin_onnx.scoring.types import Captured, Progress, ScoreConfig, Scores, Units


class MaskedModel:
    """The masked model (a mask input per block), its all-ones masks and value dtypes, and the
    objective on it: the dense teacher is the masked model with every mask at one."""

    def __init__(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig):
        self.proto = ir.to_proto(masked_model(model, structure))
        self.ones = mask_feeds(structure, unit_masks(structure, {}))
        self.dtypes = value_dtypes(self.proto, cal, self.ones)
        points = None
        if feature_kind(model, structure, cfg.feature_kind) == "blocks":
            points = block_points(self.proto, structure, self.dtypes)
        self.obj = Objective(model, structure, cal, cfg, points)


def candidate_mask(block: Block, units: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """The block's mask input with ``units`` (and whatever ``base`` already drops) masked."""
    keep = np.ones(block.n_units) if base is None else base.astype(np.float64).copy()
    keep[units] = 0
    return channel_mask(block, keep, block.consumers[0].role, block.consumers[0].group)


def mask_feeds(structure: Structure, units: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The masked model's mask-input feeds for per-block unit masks (:func:`unit_masks`)."""
    return {mask_input_name(b): channel_mask(b, units[b.name], b.consumers[0].role,
                                             b.consumers[0].group)
            for b in structure.blocks}


def score_one_by_one(block: Block, sets: list[np.ndarray], proxy: np.ndarray | None,
                     student: Callable[[np.ndarray], Captured], obj: Objective,
                     progress: Progress | None, base_loss: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit L_MD [units] and L_KD [units, objective outputs] that each candidate set adds to
    ``base_loss`` (:meth:`Objective.loss`'s layout), given how to run the model with a set masked
    (``student``)."""
    losses = np.zeros((len(sets), base_loss.size))
    for i, units in enumerate(sets):
        losses[i] = obj.loss(block, student(units)) - base_loss
        if progress:
            progress(len(units))
    return (spread(losses[:, 0], sets, proxy, block.n_units),
            spread(losses[:, 1:], sets, proxy, block.n_units))


@dataclass
class MaskedJob(SuffixJob):
    """What a masked-suffix task reads (sent once to each worker; see
    :mod:`~optin_onnx.scoring.executors`): the masked model's suffixes, the cached values of the
    base selection, the other blocks' masks and the teacher side of the loss."""

    blocks: list[Block]
    masks: dict[str, np.ndarray]  # every mask input's feed (all ones, or the base selection's)
    kept: dict[str, np.ndarray] | None  # the base selection's unit masks

    def run(self, task: Task, threads: int | None) -> Result:
        """L_MD and L_KD (one per objective output) added to the base loss, per candidate set
        of ``task``, one suffix run per candidate and calibration chunk."""
        index, batch = task
        b = self.blocks[index]
        sfx, sess = self.suffixes.open(mask_input_name(b), self.obj.wanted(b), threads)
        losses = np.zeros((len(batch), self.obj.zero_loss().size))
        for i, units in enumerate(batch):
            student = []
            for chunk, values in zip(self.cal.chunks, self.dense):
                feeds = {sfx.start: candidate_mask(b, units, None if self.kept is None
                                                   else self.kept[b.name])}
                feeds.update({k: values[k] for k in sfx.cut})
                feeds.update({k: chunk.feeds[k] if k in chunk.feeds else self.masks[k]
                              for k in sfx.graph_inputs})
                student.append(dict(zip(sfx.outputs, sess.run(sfx.outputs, feeds))))
            losses[i] = self.obj.loss(b, student) - self.base_loss[b.name]
        return losses[:, 0], losses[:, 1:]


def score_masked(model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                 only: Units | None = None, base: Units | None = None) -> Scores:
    """Exact scores by prefix reuse on the masked model: per block, the suffix downstream of its
    mask input, fed the cache of the base selection (dense without one); one candidate per run,
    ``cfg.candidates_per_run`` candidates per task, the tasks run where ``cfg.executor`` says.
    ``only`` and ``base`` as in :func:`~optin_onnx.scoring.trajectory.score_fast`."""
    t0 = time.perf_counter()
    mm = MaskedModel(model, structure, cal, cfg)
    obj = mm.obj
    nodes = nodes_by_name(model.graph)
    needed = {*obj.outputs, *obj.all_features()}
    for b in structure.blocks:
        needed.update(suffix_cut(mm.proto, mask_input_name(b), obj.wanted(b), mm.dtypes))
        needed.update(nodes[c.node].inputs[c.data_index].name for c in b.consumers)
    needed -= set(cal.feeds) | set(mm.ones)
    kept = None if base is None else unit_masks(structure, base)
    masks = mm.ones if kept is None else mask_feeds(structure, kept)
    check_cache_fits(mm.proto, cal, sorted(needed), cfg.max_memory_bytes, holders(cfg.executor),
                     masks)
    dense = capture(mm.proto, cal, sorted(needed), cfg.providers, masks)
    base_loss = anchor(obj, model, structure, cfg, base, dense,
                       lambda: capture(mm.proto, cal, obj.wanted_all(), cfg.providers, mm.ones))
    per_task = max(1, cfg.candidates_per_run)
    tasks: list[Task] = []
    sets_of, proxies = {}, {}
    for i, b in enumerate(structure.blocks):
        proxies[b.name] = channel_proxy(b, nodes, dense) if b.kind != "attention" else None
        sets = candidate_sets(b, cfg.neuron_group, proxies[b.name],
                              None if only is None else only.get(b.name, []),
                              None if base is None else base.get(b.name, range(b.n_units)))
        sets_of[b.name] = sets
        tasks.extend((i, sets[first:first + per_task]) for first in range(0, len(sets), per_task))
    job = MaskedJob(SuffixSessions(mm.proto, mm.dtypes, cfg.providers), cal, dense, obj,
                    base_loss, list(structure.blocks), masks, kept)
    return gather(structure, tasks, run_tasks(job, tasks, cfg.executor, progress), sets_of,
                  proxies, t0, cfg.lam, len(obj.outputs))
