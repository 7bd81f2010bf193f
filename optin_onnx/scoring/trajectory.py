"""Stage *score*: OPTIN's trajectory importance of every head and neuron.

    I(l, j) = sum_{z > l} L_MD(F'_z, F_z) + lambda * L_KD(logits', logits)

F' is F with only unit j of layer l masked. What F_z is (``ScoreConfig.feature_kind``):

- ``ffn``: the output of layer z's FFN second linear layer plus its bias (the feature each MLP
  block's consumer writes: OPTIN's BERT code), z > l (z = l included for the last layer);
- ``residual-ln``: the LayerNorm'ed residual stream leaving layer z, i.e. entering layer z+1 (the
  input of its Q/K/V projections; after the last layer, the final normalisation): OPTIN's ViT
  code, z >= l;
- ``auto``: ``residual-ln`` for pre-LN models (the attention projections read a LayerNorm of the
  residual stream), else ``ffn``.

- ``blocks`` (CNNs: picked by ``auto`` when the graph has conv channel groups): the block
  outputs, i.e. every activation the whole network passes through (a value that alone carries
  everything computed so far: between residual blocks, between plain conv layers, the pooled
  feature before the classifier), as the next layer sees it (pruned channels masked). A token is
  a spatial position. z runs over the points at or after the block's first consumer.

``features="local"`` (an ablation) keeps only the unit's own layer z = l in every kind (for
``blocks``, the first point after the block).

Two scorers compute the same numbers:

- :func:`score_naive`: the definition, one full forward pass of the masked model per unit.
- :func:`score_fast`: three exact cuts. (1) Prefix reuse: only the suffix downstream of the unit's
  block runs, from cached dense activations. (2) Rank-k updates: removing unit j changes its
  consumer's output by exactly ``-X[..., C_j] @ W[C_j, :]`` (C_j: the unit's channels, one for a
  neuron, head_dim for a head), so the suffix starts from that updated tensor. (3) Candidate
  batching: several candidates are stacked along the measured batch axis of every suffix input.

Conv channel groups have many consumers (every conv reading a residual stream), so the rank-k
update does not apply; their fast path runs, per candidate, only the part of the masked model
downstream of the block's mask input (still exact, one candidate per run).

Both terms are divided by their mean over all candidates before lambda weighs them, so lambda is
the relative weight of the logit term whatever the feature scale (lambda = 1: equal say on
average).

Neuron groups (``neuron_group > 1``) are the one approximation on offer: a layer's neurons (or a
conv group's channels) are ordered by a cheap local proxy (the size of their rank-1 contribution,
||a_k|| * ||W2[k]||: :func:`channel_proxy`), cut
into groups of that many adjacent neurons, and each group is masked as one candidate; its score is
shared among its neurons in proportion to the proxy. Both scorers support it identically.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Structure, pre_layer_norm, residual_features
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet, batch_axes, capture
from optin_onnx.errors import OptinError
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.instrument import (channel_mask, mask_input_name, masked_model, oriented,
                                   unit_masks)
from optin_onnx.runtime import run_all_values, session
from optin_onnx.scoring.losses import (TokenSample, cosine_loss, kl_loss, md_loss,
                                       normalised_gram, rows)
from optin_onnx.scoring.suffix import build_suffix

Progress = Callable[[int], None]


@dataclass
class ScoreConfig:
    lam: float = 1.0
    tokens: int = 768
    seed: int = 0
    candidates_per_run: int = 4  # fastest per candidate (docs/RESULTS.md, "One-off measurements")
    neuron_group: int = 1  # 1 = exact per-neuron scores
    output_kind: str = "auto"  # auto | logits | embedding | tokens
    features: str = "trajectory"  # trajectory | local (ablation: the unit's own layer only)
    # With a base selection (pruning in rounds): "current" makes the base model the teacher
    # (OPTIN's score on the pruned model as if it were the dense one); "dense" keeps the original
    # model (a score is the loss a unit adds to the base's). current is the default, chosen on
    # validation data (docs/DESIGN.md, "Pruning in rounds").
    teacher: str = "current"
    feature_kind: str = "auto"  # what F_z is: auto | ffn | residual-ln | blocks (module doc)
    providers: list[str] | None = None


@dataclass
class Scores:
    """Per-block importance (higher = keep), with the two raw loss terms behind it."""

    importance: dict[str, np.ndarray] = field(default_factory=dict)
    md: dict[str, np.ndarray] = field(default_factory=dict)
    kd: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def finalize(self, lam: float) -> "Scores":
        md_all = np.concatenate(list(self.md.values())) if self.md else np.zeros(0)
        kd_all = np.concatenate(list(self.kd.values())) if self.kd else np.zeros(0)
        md_mean = np.nanmean(md_all) if md_all.size else 0.0
        kd_mean = np.nanmean(kd_all) if kd_all.size else 0.0
        md_scale = md_mean if md_mean > 0 else 1.0
        kd_scale = kd_mean if kd_mean > 0 else 1.0
        for name in self.md:
            self.importance[name] = self.md[name] / md_scale + lam * self.kd[name] / kd_scale
        return self


def output_kind(model: ir.Model, name: str, rank: int, requested: str) -> str:
    if requested != "auto":
        return requested
    if rank >= 3:
        return "tokens"
    producer = next((n for n in model.graph if name in [o.name for o in n.outputs]), None)
    if producer is not None and producer.op_type in ("Gemm", "MatMul"):
        return "logits"
    if producer is not None and producer.op_type == "Add" and any(
            v.producer() is not None and v.producer().op_type == "MatMul" for v in producer.inputs):
        return "logits"
    return "embedding"


FEATURE_KINDS = ("auto", "ffn", "residual-ln", "blocks")


def feature_kind(model: ir.Model, structure: Structure, requested: str) -> str:
    """``requested``, with ``auto`` resolved: blocks for CNNs, residual-ln for pre-LN models,
    else ffn."""
    if requested not in FEATURE_KINDS:
        raise OptinError(f"feature kind must be one of {', '.join(FEATURE_KINDS)}, got '{requested}'")
    channels = any(b.kind == "channels" for b in structure.blocks)
    # A transformer has attention; a CNN's fully connected classifier layers are MLP blocks too.
    transformer = any(b.kind == "attention" for b in structure.blocks)
    if requested == "blocks" and not channels:
        raise OptinError("feature kind 'blocks' needs conv channel groups; use 'ffn' or "
                         "'residual-ln' for this model")
    if requested in ("ffn", "residual-ln") and not any(b.kind != "channels"
                                                       for b in structure.blocks):
        raise OptinError(f"feature kind '{requested}' needs attention or MLP blocks; use "
                         f"'blocks' for conv channel groups")
    if requested != "auto":
        return requested
    if channels and not transformer:
        return "blocks"
    # A transformer with a conv head (a dense decoder): the transformer's own features; the
    # head's channel groups come after every layer and are scored by the output term.
    return "residual-ln" if pre_layer_norm(model, structure) else "ffn"


@dataclass(frozen=True)
class Point:
    """A block output in the masked model: value ``name`` (its channels on ``axis``), produced by
    the mask Mul at position ``order``."""

    order: int
    name: str
    axis: int


def block_points(masked: onnx.ModelProto, structure: Structure,
                 dtypes: Mapping[str, np.dtype]) -> tuple[list[Point], dict[str, int]]:
    """The block outputs of a CNN (see the module doc) and, per block, the position of its first
    mask. A value is a block output when, right after it is computed, it is the only run-time
    float value still needed (constants, masks and shape arithmetic do not count)."""
    g = masked.graph
    masks = {mask_input_name(b) for b in structure.blocks}
    static = {t.name for t in g.initializer} | masks
    last = {v: i for i, n in enumerate(g.node) for v in n.input}
    last.update({o.name: len(g.node) for o in g.output})
    consumers: dict[str, list[tuple[Block, Consumer]]] = {}
    for b in structure.blocks:
        for c in b.consumers:
            consumers.setdefault(f"{c.node}__optin_mask", []).append((b, c))
    first_mask: dict[str, int] = {}
    # value -> (its masked name, channel axis, position of the Mul that masks it first)
    masked_by: dict[str, tuple[str, int, int]] = {}
    for i, n in enumerate(g.node):
        for b, c in consumers.get(n.name, []):
            first_mask.setdefault(b.name, i)
            masked_by.setdefault(n.input[0], (n.output[0], c.data_axis, i))
    live = {v.name for v in g.input if v.name not in masks and
            np.issubdtype(dtypes[v.name], np.floating)}
    points = []
    for i, n in enumerate(g.node):
        if all(not v or v in static for v in n.input):
            static.update(n.output)
            continue
        live -= {v for v in n.input if last.get(v) == i}
        for o in n.output:
            if o and o not in static and last.get(o, -1) > i and \
                    np.issubdtype(dtypes[o], np.floating):
                live.add(o)
        if len(live) == 1 and next(iter(live)) in n.output and next(iter(live)) in masked_by:
            # ordered where it is masked: a block's own masked output is on its trajectory
            name, axis, at = masked_by[next(iter(live))]
            points.append(Point(at, name, axis))
    return points, first_mask


class Objective:
    """The teacher side of the loss: features, sampled tokens, Gram matrices, output."""

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
        self.output = model.graph.outputs[0].name
        self.tokens = TokenSample.draw(cal.token_mask, cfg.tokens, cfg.seed)
        self.has_mask = MASK_INPUT in cal.feeds
        self._plain: dict[int, TokenSample] = {}

    def features_for(self, block: Block) -> list[str]:
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
        return list(dict.fromkeys(self.layer_feature.values()))

    def set_teacher(self, model: ir.Model, dense: list[dict[str, np.ndarray]]) -> None:
        rank = dense[0][self.output].ndim
        if rank == 4:  # a dense NCHW output (a segmentation decoder): channels are the vector
            self.axis[self.output] = 1
        self.kind = output_kind(model, self.output, rank, self.cfg.output_kind)
        self.gram = {f: normalised_gram(self.gather(f, dense)) for f in self.all_features()}
        if self.kind == "tokens":
            self.teacher_out = normalised_gram(self.gather(self.output, dense))
        else:
            self.teacher_out = np.concatenate([d[self.output] for d in dense])

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

    def loss(self, block: Block, student: list[dict[str, np.ndarray]]) -> tuple[float, float]:
        md = sum(md_loss(self.gram[f], self.gather(f, student)) for f in self.features_for(block))
        if self.kind == "tokens":
            kd = md_loss(self.teacher_out, self.gather(self.output, student))
        else:
            out = np.concatenate([s[self.output] for s in student])
            kd = kl_loss(self.teacher_out, out) if self.kind == "logits" else \
                cosine_loss(self.teacher_out, out)
        return float(md), float(kd)

    def wanted(self, block: Block) -> list[str]:
        return list(dict.fromkeys(self.features_for(block) + [self.output]))

    def wanted_all(self) -> list[str]:
        """Every value the teacher side needs."""
        return list(dict.fromkeys(self.all_features() + [self.output]))


def _dtypes(proto: onnx.ModelProto, cal: CalibrationSet,
            extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.dtype]:
    feeds = {**{k: a[:1] for k, a in cal.chunks[0].feeds.items()}, **(extra or {})}
    values = run_all_values(proto, feeds)
    out = {k: v.dtype for k, v in values.items()}
    out.update({k: a.dtype for k, a in feeds.items()})
    return out


def candidate_sets(block: Block, group: int, proxy: np.ndarray | None,
                   only: Sequence[int] | None = None,
                   alive: Sequence[int] | None = None) -> list[np.ndarray]:
    """The unit sets scored for ``block``: singletons, or for MLP blocks with ``group > 1``,
    runs of ``group`` neurons adjacent in proxy order. ``only`` restricts exact scoring to some
    units (benchmarks compare scorers on a subset; the rest score NaN). ``alive``: the units not
    yet pruned (iterative pruning); the others are no candidates and score NaN."""
    units = np.arange(block.n_units) if alive is None else np.asarray(sorted(alive), dtype=int)
    if block.kind == "attention" or group <= 1:
        picked = units if only is None else [u for u in only if u in set(units.tolist())]
        return [np.array([u]) for u in picked]
    order = units[np.argsort(-proxy[units], kind="stable")]
    return [order[i:i + group] for i in range(0, len(order), group)]


def _spread(scores: np.ndarray, sets: list[np.ndarray], proxy: np.ndarray | None,
            n_units: int) -> np.ndarray:
    """Per-unit values from per-set values (a set's value shared in proportion to the proxy)."""
    out = np.full(n_units, np.nan)
    for value, units in zip(scores, sets):
        if len(units) == 1 or proxy is None:
            out[units] = value / len(units)
        else:
            share = proxy[units] / max(proxy[units].sum(), 1e-30)
            out[units] = value * share
    return out


def _split(arr: np.ndarray, n: int, axis: int | None) -> list[np.ndarray]:
    if axis is None:
        return [arr] * n
    return np.split(arr, n, axis=axis)


def _tile(arr: np.ndarray, n: int, axis: int | None) -> np.ndarray:
    return arr if axis is None or n == 1 else np.concatenate([arr] * n, axis=axis)


TEACHERS = ("dense", "current")


def _anchor(obj: "Objective", model: ir.Model, structure: Structure, cfg: ScoreConfig, base,
            current: list[dict[str, np.ndarray]],
            dense: Callable[[], list[dict[str, np.ndarray]]]) -> dict[str, tuple]:
    """Set the teacher and return, per block, the loss the scores are measured from.

    Without ``base``, or with ``cfg.teacher == "current"``, the teacher is the model being scored
    (``current``: the dense model, or the base selection applied) and every score starts from
    zero. With ``"dense"`` the teacher is the unpruned model (``dense()``, captured on demand) and
    a score is the loss a candidate adds to the base selection's own loss."""
    if cfg.teacher not in TEACHERS:
        raise OptinError(f"teacher must be one of {', '.join(TEACHERS)}, got '{cfg.teacher}'")
    if base is None or cfg.teacher == "current":
        obj.set_teacher(model, current)
        return {b.name: (0.0, 0.0) for b in structure.blocks}
    obj.set_teacher(model, dense())
    return {b.name: obj.loss(b, current) for b in structure.blocks}


def score_fast(model: ir.Model, structure: Structure, cal: CalibrationSet,
               cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
               only: Mapping[str, Sequence[int]] | None = None,
               base: Mapping[str, Sequence[int]] | None = None) -> Scores:
    """Exact trajectory scores with prefix reuse, rank-k updates and candidate batching.

    ``only`` (block name -> unit indices) scores only those units (others: NaN).

    ``base`` (block name -> kept units; iterative pruning): the units it drops are already
    masked in the student and are no candidates (NaN). The teacher is ``cfg.teacher``: the
    unmasked ``model`` ("dense": a candidate's score is the loss it adds to the base selection's
    own loss) or the base model itself ("current")."""
    if any(b.kind == "channels" for b in structure.blocks):
        return _score_masked(model, structure, cal, cfg, progress, only, base)
    t0 = time.perf_counter()
    teacher_proto = ir.to_proto(model)
    # The base masks as constant Muls before the consumers: each consumer's data input is then
    # the masked activation, so the rank-k update of a dropped unit is zero by construction.
    base_model = model if base is None else masked_model(model, structure,
                                                         unit_masks(structure, base))
    proto = ir.to_proto(base_model)
    nodes = nodes_by_name(base_model.graph)
    obj = Objective(model, structure, cal, cfg)
    dtypes = _dtypes(proto, cal)
    plans = []
    for b in structure.blocks:
        if len(b.consumers) != 1:
            raise OptinError(f"{b.name} has {len(b.consumers)} consumers; the fast scorer needs one")
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
    base_loss = _anchor(obj, model, structure, cfg, base, dense,
                        lambda: capture(teacher_proto, cal, obj.wanted_all(), cfg.providers))
    axes = batch_axes(proto, cal, sorted(needed | set(cal.feeds)))
    scores = Scores()
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
            student: list[list[dict[str, np.ndarray]]] = [[] for _ in batch]
            for chunk, values in zip(cal.chunks, dense):
                x, y = values[x_name], values[y_name]
                ys = []
                for units in batch:
                    keep = np.ones(b.n_units)
                    keep[units] = 0
                    ch = np.flatnonzero(channel_mask(b, keep, c.role) == 0)
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
        scores.md[b.name] = _spread(md, sets, proxy, b.n_units)
        scores.kd[b.name] = _spread(kd, sets, proxy, b.n_units)
    scores.seconds = time.perf_counter() - t0
    return scores.finalize(cfg.lam)


class _Masked:
    """The masked model (a mask input per block), its all-ones masks and value dtypes, and the
    objective on it: the dense teacher is the masked model with every mask at one."""

    def __init__(self, model: ir.Model, structure: Structure, cal: CalibrationSet,
                 cfg: ScoreConfig):
        self.proto = ir.to_proto(masked_model(model, structure))
        self.ones = _mask_feeds(structure, unit_masks(structure, {}))
        self.dtypes = _dtypes(self.proto, cal, self.ones)
        points = None
        if feature_kind(model, structure, cfg.feature_kind) == "blocks":
            points = block_points(self.proto, structure, self.dtypes)
        self.obj = Objective(model, structure, cal, cfg, points)


def _candidate_mask(block: Block, units: np.ndarray,
                    base: np.ndarray | None = None) -> np.ndarray:
    """The block's mask input with ``units`` (and whatever ``base`` already drops) masked."""
    keep = np.ones(block.n_units) if base is None else base.astype(np.float64).copy()
    keep[units] = 0
    return channel_mask(block, keep, block.consumers[0].role)


def _mask_feeds(structure: Structure, units: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The masked model's mask-input feeds for per-block unit masks (:func:`unit_masks`)."""
    return {mask_input_name(b): channel_mask(b, units[b.name], b.consumers[0].role)
            for b in structure.blocks}


def channel_proxy(block: Block, nodes: dict[str, ir.Node],
                  dense: list[dict[str, np.ndarray]]) -> np.ndarray:
    """||a_k|| * ||W[k]|| per unit, summed over the block's consumers: the size of unit k's
    contribution to their outputs (a conv's weight is [out, in, kh, kw]; a flattened map repeats
    each channel)."""
    total = np.zeros(block.n_units)
    for c in block.consumers:
        node = nodes[c.node]
        w = const_array(node.inputs[c.weight_index]).astype(np.float64)
        w_sq = np.moveaxis(w ** 2, c.weight_axis, 0).reshape(w.shape[c.weight_axis], -1).sum(1)
        x_sq = np.zeros(w_sq.size)
        for values in dense:
            x = values[node.inputs[c.data_index].name].astype(np.float64)
            x_sq += np.moveaxis(x ** 2, c.data_axis, 0).reshape(x.shape[c.data_axis], -1).sum(1)
        norm = np.sqrt(x_sq) * np.sqrt(w_sq)
        total += norm.reshape(block.n_units, -1).sum(1)
    return total


def _score_masked(model: ir.Model, structure: Structure, cal: CalibrationSet, cfg: ScoreConfig,
                  progress: Progress | None, only: Mapping[str, Sequence[int]] | None,
                  base: Mapping[str, Sequence[int]] | None = None) -> Scores:
    """Exact scores by prefix reuse on the masked model: per block, the suffix downstream of its
    mask input, fed the cache of the base selection (dense without one); one candidate per run."""
    t0 = time.perf_counter()
    mm = _Masked(model, structure, cal, cfg)
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
    masks = mm.ones if kept is None else _mask_feeds(structure, kept)
    dense = capture(mm.proto, cal, sorted(needed), cfg.providers, masks)
    base_loss = _anchor(obj, model, structure, cfg, base, dense,
                        lambda: capture(mm.proto, cal, obj.wanted_all(), cfg.providers, mm.ones))
    scores = Scores()
    for b, sfx in plans:
        proxy = channel_proxy(b, nodes, dense) if b.kind != "attention" else None
        sets = candidate_sets(b, cfg.neuron_group, proxy,
                              None if only is None else only.get(b.name, []),
                              None if base is None else base.get(b.name, range(b.n_units)))
        sess = session(sfx.model, cfg.providers, outputs=sfx.outputs)

        def student(units: np.ndarray) -> list[dict[str, np.ndarray]]:
            out = []
            for chunk, values in zip(cal.chunks, dense):
                feeds = {sfx.start: _candidate_mask(b, units, None if kept is None
                                                    else kept[b.name])}
                feeds.update({k: values[k] for k in sfx.cut})
                feeds.update({k: chunk.feeds[k] if k in chunk.feeds else masks[k]
                              for k in sfx.graph_inputs})
                out.append(dict(zip(sfx.outputs, sess.run(sfx.outputs, feeds))))
            return out

        _score_one_by_one(b, sets, proxy, student, obj, scores, progress, base_loss[b.name])
    scores.seconds = time.perf_counter() - t0
    return scores.finalize(cfg.lam)


def _score_one_by_one(block: Block, sets: list[np.ndarray], proxy: np.ndarray | None,
                      student: Callable[[np.ndarray], list[dict[str, np.ndarray]]],
                      obj: Objective, scores: Scores, progress: Progress | None,
                      base_loss: tuple[float, float] = (0.0, 0.0)) -> None:
    """Loss each candidate set adds to ``base_loss``, given how to run the model with it masked;
    per-unit scores."""
    md, kd = np.zeros(len(sets)), np.zeros(len(sets))
    for i, units in enumerate(sets):
        md[i], kd[i] = np.subtract(obj.loss(block, student(units)), base_loss)
        if progress:
            progress(len(units))
    scores.md[block.name] = _spread(md, sets, proxy, block.n_units)
    scores.kd[block.name] = _spread(kd, sets, proxy, block.n_units)


def score_naive(model: ir.Model, structure: Structure, cal: CalibrationSet,
                cfg: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                only: Mapping[str, Sequence[int]] | None = None,
                base: Mapping[str, Sequence[int]] | None = None) -> Scores:
    """The reference: one full forward pass of the masked model per unit (slow, obviously right).
    ``only`` and ``base`` as in :func:`score_fast`."""
    t0 = time.perf_counter()
    mm = _Masked(model, structure, cal, cfg)
    obj, ones = mm.obj, mm.ones
    kept = None if base is None else unit_masks(structure, base)
    masks = ones if kept is None else _mask_feeds(structure, kept)
    outputs = obj.wanted_all()
    base_loss = _anchor(obj, model, structure, cfg, base,
                        capture(mm.proto, cal, outputs, cfg.providers, masks),
                        lambda: capture(mm.proto, cal, outputs, cfg.providers, ones))
    sess = session(mm.proto, cfg.providers, outputs=outputs)
    nodes = nodes_by_name(model.graph)
    scores = Scores()
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

        def student(units: np.ndarray) -> list[dict[str, np.ndarray]]:
            feeds = dict(masks, **{mask_input_name(b): _candidate_mask(
                b, units, None if kept is None else kept[b.name])})
            return [dict(zip(outputs, sess.run(outputs, {**chunk.feeds, **feeds})))
                    for chunk in cal.chunks]

        _score_one_by_one(b, sets, proxy, student, obj, scores, progress, base_loss[b.name])
    scores.seconds = time.perf_counter() - t0
    return scores.finalize(cfg.lam)
