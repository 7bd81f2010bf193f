"""Stage *score*: OPTIN's trajectory importance of every head, neuron and channel.

    I(l, j) = sum_{z > l} L_MD(F'_z, F_z) + lambda * L_KD(logits', logits)

F' is F with only unit j of layer l masked. What F_z is (``ScoreConfig.feature_kind``, resolved
in :mod:`~optin_onnx.scoring.features`):

- ``ffn``: the output of layer z's FFN second linear layer plus its bias (the feature each MLP
  block's consumer writes: OPTIN's BERT code), z > l (z = l included for the last layer);
- ``residual-ln``: the LayerNorm'ed residual stream leaving layer z, i.e. entering layer z+1 (the
  input of its Q/K/V projections; after the last layer, the final normalisation): OPTIN's ViT
  code, z >= l;
- ``auto``: ``residual-ln`` for pre-LN models (the attention projections read a LayerNorm of the
  residual stream), else ``ffn``.

- ``blocks`` (CNNs: picked by ``auto`` when the graph has conv channel groups): the block
  outputs (:mod:`~optin_onnx.scoring.liveness`), as the next layer sees them (pruned channels
  masked). A token is a spatial position. z runs over the points at or after the block's first
  consumer.

``features="local"`` (an ablation) keeps only the unit's own layer z = l in every kind (for
``blocks``, the first point after the block).

Both terms are divided by their mean over all candidates before lambda weighs them
(:meth:`~optin_onnx.scoring.types.Scores.finalize`). Where each part lives:

- :mod:`~optin_onnx.scoring.types`: the config and the result;
- :mod:`~optin_onnx.scoring.teacher`: the teacher side of the loss (:mod:`.losses` its terms);
- :mod:`~optin_onnx.scoring.candidates`: which units are masked together (neuron groups);
- three scorers computing the same numbers: :func:`~optin_onnx.scoring.fast.score_rank_k`
  (blocks with one consumer: prefix reuse, rank-k updates, candidate batching),
  :func:`~optin_onnx.scoring.masked.score_masked` (any block, conv channel groups included:
  prefix reuse on the masked model, one candidate per run) and
  :func:`~optin_onnx.scoring.naive.score_naive` (the definition: one full forward per unit).

This module chooses between the two fast ones (:func:`fast_scorer`).
"""
from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.scoring.fast import score_rank_k
from optin_onnx.scoring.masked import score_masked
# Re-exported: the reference scorer is reached from this entry point with the fast ones (the
# tests and tools/bench_text compare them).
from optin_onnx.scoring.naive import score_naive
from optin_onnx.scoring.types import Progress, ScoreConfig, Scores, Units

#: The signature every trajectory scorer shares.
Scorer = Callable[[ir.Model, Structure, CalibrationSet, ScoreConfig, Progress | None,
                   Units | None, Units | None], Scores]


def fast_scorer(structure: Structure) -> Scorer:
    """The exact scorer that is fastest for ``structure``.

    The rank-k scorer needs every block to have one consumer; a conv channel group has many
    (every conv reading a residual stream), and so has a block whose weights are applied in
    several layers (ALBERT), so such a structure is scored on the masked model, one candidate
    per run."""
    if any(b.kind == "channels" or len(b.consumers) != 1 for b in structure.blocks):
        return score_masked
    return score_rank_k


def score_fast(model: ir.Model, structure: Structure, cal: CalibrationSet,
               cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
               only: Units | None = None, base: Units | None = None) -> Scores:
    """Exact trajectory scores by the scorer :func:`fast_scorer` picks for ``structure``.

    ``only`` (block name -> unit indices) scores only those units (others: NaN).

    ``base`` (block name -> kept units; iterative pruning): the units it drops are already
    masked in the student and are no candidates (NaN). The teacher is ``cfg.teacher``: the
    unmasked ``model`` ("dense": a candidate's score is the loss it adds to the base selection's
    own loss) or the base model itself ("current")."""
    return fast_scorer(structure)(model, structure, cal, cfg, progress, only, base)


__all__ = ["ScoreConfig", "Scorer", "Scores", "fast_scorer", "score_fast", "score_naive"]
