"""The teacher side of the trajectory loss, and which model is the teacher.

:class:`Objective` holds what every candidate is compared against (the features F_z it is
measured on, the sampled tokens, the teacher's Gram matrices and objective outputs) and turns a
student's captured values into the loss terms: L_MD, and one L_KD per objective output.
:func:`anchor` decides the teacher when scoring on top of an earlier selection (rounds), and what
loss a score is measured from.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Structure, residual_features
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet
from optin_onnx.errors import OptinError
from optin_onnx.scoring.features import (feature_kind, objective_outputs, output_kind,
                                         outputs_reached)
from optin_onnx.scoring.liveness import Point
from optin_onnx.scoring.losses import (TokenSample, cosine_loss, kl_loss, md_loss,
                                       normalised_gram, rows)
from optin_onnx.scoring.types import Captured, ScoreConfig, Units


class Objective:
    """The teacher side of the loss: features, sampled tokens, Gram matrices, and the objective
    outputs (``outputs``: :func:`~optin_onnx.scoring.features.objective_outputs` of
    ``cfg.objective_outputs``)."""

    def __init__(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig, points: tuple[list[Point], dict[str, int]] | None = None):
        self.structure = structure
        self.cal = cal
        self.cfg = cfg
        self.feature_kind = feature_kind(model, structure, cfg.feature_kind)
        self.axis: dict[str, int] = {}  # feature -> its channel axis, where not the last
        if self.feature_kind == "blocks":
            if points is None:
                raise OptinError("internal: block features need the masked model's points")
            self.points, self.first_mask = points
            self.layer_feature = {k: p.name for k, p in enumerate(self.points)}
            self.axis = {p.name: p.axis for p in self.points}
        elif self.feature_kind == "residual-ln":
            self.layer_feature = residual_features(model, structure)
        else:
            mlp = [b for b in structure.blocks if b.kind == "mlp"]
            carriers = mlp if mlp else structure.blocks
            self.layer_feature = {b.layer: b.feature for b in carriers}
        self.outputs = objective_outputs(model, structure, cfg.objective_outputs)
        # Per block, the objective outputs its units can change; the others keep the teacher's
        # values whatever is masked, so their term is zero and no run computes them.
        self.reached = {block: [o for o in self.outputs if o in reached]
                        for block, reached in outputs_reached(model, structure).items()}
        self.tokens = TokenSample.draw(cal.token_mask, cfg.tokens, cfg.seed)
        self.has_mask = MASK_INPUT in cal.feeds
        self._plain: dict[int, TokenSample] = {}

    def features_for(self, block: Block) -> list[str]:
        """The features F_z a candidate of ``block`` is measured on (its trajectory: the layers
        at or after it, or its own layer alone for the ``local`` ablation)."""
        if self.feature_kind == "blocks":
            after = [p.name for p in self.points if p.order >= self.first_mask[block.name]]
            return after[:1] if self.cfg.features == "local" else after
        layers = sorted(self.layer_feature)
        if self.cfg.features == "local":
            chosen = [z for z in layers if z == block.layer]
        elif self.feature_kind == "residual-ln":  # F_z follows layer z: layer l's own output counts
            chosen = [z for z in layers if z >= block.layer]
        else:
            chosen = [z for z in layers if z > block.layer] or [z for z in layers if z == block.layer]
        return [self.layer_feature[z] for z in chosen]

    def all_features(self) -> list[str]:
        """Every feature some block is measured on (the teacher's Gram matrices cover these)."""
        return list(dict.fromkeys(self.layer_feature.values()))

    def set_teacher(self, model: ir.Model, dense: Captured) -> None:
        """Take the teacher's values from ``dense`` (its captured features and outputs), and
        resolve each output's kind now that its rank is known."""
        self.kinds: dict[str, str] = {}
        self.teacher_out: dict[str, np.ndarray] = {}
        for name in self.outputs:
            rank = dense[0][name].ndim
            if rank == 4:  # a dense NCHW output (a segmentation decoder): channels are the vector
                self.axis[name] = 1
            self.kinds[name] = output_kind(model, name, rank, self.cfg.output_kind)
            self.teacher_out[name] = (normalised_gram(self.gather(name, dense))
                                      if self.kinds[name] == "tokens" else
                                      np.concatenate([d[name] for d in dense]))
        self.gram = {f: normalised_gram(self.gather(f, dense)) for f in self.all_features()}

    def gather(self, name: str, chunks: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
        """The K sampled token rows of feature ``name`` across chunks (in sample order).

        A feature with one row per token (as many rows per sample as the chunk's sequence) uses
        the padding-aware token sample; any other layout (pooled features, models without a
        sequence axis) samples among all its rows per sample."""
        parts = []
        for chunk, values in zip(self.cal.chunks, chunks):
            value = values[name]
            axis = self.axis.get(name, -1)
            if axis in (-1, value.ndim - 1):
                feature = rows(value)
                per_sample = feature.shape[0] // (chunk.stop - chunk.start)
            else:  # channels first ([N, C, H, W]): pick the sampled positions, never transpose all
                feature = np.moveaxis(value, axis, 1).reshape(value.shape[0], value.shape[axis], -1)
                per_sample = feature.shape[2]
            if self.has_mask and per_sample == chunk.seq_len:
                sample = self.tokens
            else:
                if per_sample not in self._plain:
                    self._plain[per_sample] = TokenSample.draw(
                        np.ones((self.cal.n, per_sample), bool), self.cfg.tokens, self.cfg.seed)
                sample = self._plain[per_sample]
            _, idx = sample.rows_in_chunk(chunk.start, chunk.stop, per_sample)
            parts.append(feature[idx] if feature.ndim == 2 else
                         feature[idx // per_sample, :, idx % per_sample])
        return np.concatenate(parts)

    def loss(self, block: Block, student: Captured) -> np.ndarray:
        """[L_MD summed over ``block``'s features, L_KD of each objective output] of a student's
        values (0 for an output ``block`` cannot change); the scale of each output's L_KD is
        evened out later, in :meth:`~optin_onnx.scoring.types.Scores.finalize`."""
        md = sum(md_loss(self.gram[f], self.gather(f, student)) for f in self.features_for(block))
        reached = self.reached[block.name]
        return np.array([float(md), *(self.output_loss(name, student) if name in reached else 0.0
                                      for name in self.outputs)])

    def output_loss(self, name: str, student: Captured) -> float:
        """L_KD on output ``name``, by its kind: L_MD of token outputs, KL of logits, 1 - cosine
        of an embedding."""
        kind, teacher = self.kinds[name], self.teacher_out[name]
        if kind == "tokens":
            return float(md_loss(teacher, self.gather(name, student)))
        out = np.concatenate([s[name] for s in student])
        return float(kl_loss(teacher, out) if kind == "logits" else cosine_loss(teacher, out))

    def zero_loss(self) -> np.ndarray:
        """The loss of the teacher against itself: what a score starts from."""
        return np.zeros(1 + len(self.outputs))

    def wanted(self, block: Block) -> list[str]:
        """The values a student run for a candidate of ``block`` must return."""
        return list(dict.fromkeys(self.features_for(block) + self.reached[block.name]))

    def wanted_all(self) -> list[str]:
        """Every value the teacher side needs."""
        return list(dict.fromkeys(self.all_features() + self.outputs))

TEACHERS = ("dense", "current")


def anchor(obj: Objective, model: ir.Model, structure: Structure, cfg: ScoreConfig,
           base: Units | None, current: Captured, dense: Callable[[], Captured]
           ) -> dict[str, np.ndarray]:
    """Set the teacher and return, per block, the loss the scores are measured from.

    Without ``base``, or with ``cfg.teacher == "current"``, the teacher is the model being scored
    (``current``: the dense model, or the base selection applied) and every score starts from
    zero. With ``"dense"`` the teacher is the unpruned model (``dense()``, captured on demand) and
    a score is the loss a candidate adds to the base selection's own loss."""
    if cfg.teacher not in TEACHERS:
        raise OptinError(f"teacher must be one of {', '.join(TEACHERS)}, got '{cfg.teacher}'")
    if base is None or cfg.teacher == "current":
        obj.set_teacher(model, current)
        return {b.name: obj.zero_loss() for b in structure.blocks}
    obj.set_teacher(model, dense())
    return {b.name: obj.loss(b, current) for b in structure.blocks}
