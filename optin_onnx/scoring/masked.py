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

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Structure
from optin_onnx.calibrate import CalibrationSet, capture
from optin_onnx.graph import nodes_by_name
from optin_onnx.instrument import channel_mask, mask_input_name, masked_model, unit_masks
from optin_onnx.runtime import session
from optin_onnx.scoring.candidates import candidate_sets, channel_proxy, spread
from optin_onnx.scoring.features import feature_kind
from optin_onnx.scoring.liveness import block_points
from optin_onnx.scoring.suffix import build_suffix, value_dtypes
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
                     progress: Progress | None, base_loss: tuple[float, float] = (0.0, 0.0)
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit (L_MD, L_KD) that each candidate set adds to ``base_loss``, given how to run the
    model with a set masked (``student``)."""
    md, kd = np.zeros(len(sets)), np.zeros(len(sets))
    for i, units in enumerate(sets):
        md[i], kd[i] = np.subtract(obj.loss(block, student(units)), base_loss)
        if progress:
            progress(len(units))
    return spread(md, sets, proxy, block.n_units), spread(kd, sets, proxy, block.n_units)


def score_masked(model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                 only: Units | None = None, base: Units | None = None) -> Scores:
    """Exact scores by prefix reuse on the masked model: per block, the suffix downstream of its
    mask input, fed the cache of the base selection (dense without one); one candidate per run.
    ``only`` and ``base`` as in :func:`~optin_onnx.scoring.trajectory.score_fast`."""
    t0 = time.perf_counter()
    mm = MaskedModel(model, structure, cal, cfg)
    obj = mm.obj
    nodes = nodes_by_name(model.graph)
    plans = [(b, build_suffix(mm.proto, mask_input_name(b), obj.wanted(b), mm.dtypes))
             for b in structure.blocks]
    needed = {obj.output, *obj.all_features()}
    for b, sfx in plans:
        needed.update(sfx.cut)
        needed.update(nodes[c.node].inputs[c.data_index].name for c in b.consumers)
    needed -= set(cal.feeds) | set(mm.ones)
    kept = None if base is None else unit_masks(structure, base)
    masks = mm.ones if kept is None else mask_feeds(structure, kept)
    dense = capture(mm.proto, cal, sorted(needed), cfg.providers, masks)
    base_loss = anchor(obj, model, structure, cfg, base, dense,
                       lambda: capture(mm.proto, cal, obj.wanted_all(), cfg.providers, mm.ones))
    md: dict[str, np.ndarray] = {}
    kd: dict[str, np.ndarray] = {}
    for b, sfx in plans:
        proxy = channel_proxy(b, nodes, dense) if b.kind != "attention" else None
        sets = candidate_sets(b, cfg.neuron_group, proxy,
                              None if only is None else only.get(b.name, []),
                              None if base is None else base.get(b.name, range(b.n_units)))
        sess = session(sfx.model, cfg.providers, outputs=sfx.outputs)

        def student(units: np.ndarray) -> Captured:
            out = []
            for chunk, values in zip(cal.chunks, dense):
                feeds = {sfx.start: candidate_mask(b, units, None if kept is None
                                                   else kept[b.name])}
                feeds.update({k: values[k] for k in sfx.cut})
                feeds.update({k: chunk.feeds[k] if k in chunk.feeds else masks[k]
                              for k in sfx.graph_inputs})
                out.append(dict(zip(sfx.outputs, sess.run(sfx.outputs, feeds))))
            return out

        md[b.name], kd[b.name] = score_one_by_one(b, sets, proxy, student, obj, progress,
                                                  base_loss[b.name])
    return Scores(md=md, kd=kd, seconds=time.perf_counter() - t0).finalize(cfg.lam)
