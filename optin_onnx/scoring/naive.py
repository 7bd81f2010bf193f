"""The reference scorer: the definition of the trajectory score, computed the slow way.

One full forward pass of the masked model per candidate, nothing cached or updated. The fast
scorers are tested against it (they must agree to float rounding), so it stays as plain as the
definition allows.
"""
from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet, capture
from optin_onnx.graph import nodes_by_name
from optin_onnx.instrument import mask_input_name, unit_masks
from optin_onnx.runtime import session
from optin_onnx.scoring.candidates import candidate_sets, channel_proxy
from optin_onnx.scoring.masked import MaskedModel, candidate_mask, mask_feeds, score_one_by_one
from optin_onnx.scoring.teacher import anchor
from optin_onnx.scoring.types import Captured, Progress, ScoreConfig, Scores, Units


def score_naive(model: ir.Model, structure: Structure, cal: CalibrationSet,
                cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                only: Units | None = None, base: Units | None = None) -> Scores:
    """The reference: one full forward pass of the masked model per unit (slow, obviously right).
    ``only`` and ``base`` as in :func:`~optin_onnx.scoring.trajectory.score_fast`."""
    t0 = time.perf_counter()
    mm = MaskedModel(model, structure, cal, cfg)
    obj, ones = mm.obj, mm.ones
    kept = None if base is None else unit_masks(structure, base)
    masks = ones if kept is None else mask_feeds(structure, kept)
    outputs = obj.wanted_all()
    base_loss = anchor(obj, model, structure, cfg, base,
                       capture(mm.proto, cal, outputs, cfg.providers, masks),
                       lambda: capture(mm.proto, cal, outputs, cfg.providers, ones))
    sess = session(mm.proto, cfg.providers, outputs=outputs)
    nodes = nodes_by_name(model.graph)
    md: dict[str, np.ndarray] = {}
    kd: dict[str, np.ndarray] = {}
    for b in structure.blocks:
        proxy = None
        if b.kind != "attention" and cfg.neuron_group > 1:
            # the consumers' inputs in the base model (before their own mask: the proxy of an
            # alive unit is the same either way, and dropped units are no candidates)
            xs = [nodes[k.node].inputs[k.data_index].name for k in b.consumers]
            proxy = channel_proxy(b, nodes, capture(mm.proto, cal, xs, cfg.providers, masks))
        sets = candidate_sets(b, cfg.neuron_group, proxy,
                              None if only is None else only.get(b.name, []),
                              None if base is None else base.get(b.name, range(b.n_units)))

        def student(units: np.ndarray) -> Captured:
            feeds = dict(masks, **{mask_input_name(b): candidate_mask(
                b, units, None if kept is None else kept[b.name])})
            return [dict(zip(outputs, sess.run(outputs, {**chunk.feeds, **feeds})))
                    for chunk in cal.chunks]

        md[b.name], kd[b.name] = score_one_by_one(b, sets, proxy, student, obj, progress,
                                                  base_loss[b.name])
    return Scores(md=md, kd=kd, seconds=time.perf_counter() - t0).finalize(cfg.lam)
