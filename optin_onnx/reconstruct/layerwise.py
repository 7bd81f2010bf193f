"""Stage *reconstruct*, ``--reconstruct refit`` (the default): a closed-form refit of
the layer that reads each block's kept units, guarded by held-out samples.

Consumer by consumer in graph order, the consumer weight's kept rows (the attention output
projection's rows of the kept heads, the FFN's second linear layer's rows of the kept neurons, a
conv's or Gemm's input channels: every reader of a conv channel group, a k x k conv through its
im2col patches, a reader after a channel Concat or a Flatten on its own rows only), all its output
columns and its bias are refitted by ridge regression (K-prune, ICLR 2024; He et al. 2017 for
convs):

    min_W,db || X W + db - T ||^2 + lam || W - W0 ||^2

X: the kept channels of the consumer input in the *pruned and already corrected* model, so the
error every earlier block left is visible. T: where the block ends in a residual add, the dense
model's pre-LayerNorm sum minus the pruned model's own residual input there (the consumer output
that would make the pruned sum equal the dense one), so each block absorbs the error that reached
it and not only its own; elsewhere the dense model's consumer output. The fit runs in float64 on
streamed Gram matrices (:mod:`optin_onnx.reconstruct.gram`).

The guard: the fit is made on the scoring samples; the candidates (a ridge solve per damping of
:data:`DAMPINGS`, and FLAP's bias compensation, db = mean(T - X W0) with the weights kept) are
compared on the held-out samples, and a block keeps the best candidate only if it lowers the
held-out error at its own point. The whole model is then checked the same way: if the corrected
model's held-out output is not closer to the dense model's than the uncorrected one, every fit is
dropped. The result is a plain graph with new constants; verify compares the slim graph with this
corrected model, masked.

The convs that read no pruned group but sit downstream of one (a depthwise conv of an inverted
residual block) are fitted in the same pass, in graph order, channel by channel
(:mod:`optin_onnx.reconstruct.channelwise`), under the same guard.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Block, Consumer, Role, Structure
from optin_onnx.calibrate import MASK_INPUT, CalibrationSet
from optin_onnx.graph import const_array, copy_model, nodes_by_name
from optin_onnx.instrument import oriented, unit_masks
from optin_onnx.reconstruct.channelwise import ChannelPlan, channel_plan, fit_channels
from optin_onnx.reconstruct.gram import Gram, ridge
from optin_onnx.reconstruct.scales import consumer_matrix
from optin_onnx.reconstruct.session import (Session, Window, relative_error, replace_constant,
                                             rows, shared)

#: Ridge dampings tried per block (relative to the mean diagonal of X^T X); the held-out samples
#: choose among them, so no single value has to suit every layer.
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
#: Held-out gains smaller than this fraction of the target's squared norm are rounding noise.
NOISE = 1e-9


@dataclass
class BlockRefit:
    """One block's outcome. ``method``: ``ridge``, ``bias`` (FLAP's compensation) or ``none``;
    the held-out errors are squared errors at the block's point (its residual sum, or its
    consumer output), before and after."""

    block: str
    method: str
    held_before: float = 0.0
    held_after: float = 0.0
    damping: float | None = None
    reason: str = ""
    gram_bytes: int = 0  # the fit's and the check's float64 Gram matrices together


@dataclass
class RefitResult:
    """``held_before``/``held_after``: the model output's held-out squared error relative to the
    dense output's squared norm, without and with the fits (``kept`` False: they were dropped)."""

    model: ir.Model
    blocks: list[BlockRefit] = field(default_factory=list)
    held_before: float = 0.0
    held_after: float = 0.0
    kept: bool = False
    gram_bytes: int = 0

    def notes(self) -> list[str]:
        """The report's lines: which blocks were refitted and the held-out errors."""
        fitted = [b for b in self.blocks if b.method != "none"]
        if not self.kept:
            why = ("no block's fit lowered its held-out error" if not fitted else
                   f"the refitted model's held-out output error was not lower "
                   f"({self.held_before:.4g} -> {self.held_after:.4g})")
            return [f"refit not applied: {why}"]
        parts = [f"{b.block} {b.method}" + (f" (damping {b.damping:g})" if b.damping else "")
                 + f" {b.held_before:.3g} -> {b.held_after:.3g}" for b in fitted]
        skipped = [f"{b.block} ({b.reason})" for b in self.blocks if b.method == "none"]
        return [f"refit applied to {len(fitted)} of {len(self.blocks)} blocks; held-out output "
                f"error (squared, relative to the dense output) {self.held_before:.4g} -> "
                f"{self.held_after:.4g}; largest Gram matrices {self.gram_bytes / 2**20:.1f} MiB",
                "refitted blocks (held-out squared error at the block, before -> after): "
                + ", ".join(parts)] + (["not refitted: " + ", ".join(skipped)] if skipped else [])


@dataclass(frozen=True)
class _Plan:
    """Where a block's refit reads and writes. ``point``: the value the target is defined at
    (the residual sum, or the consumer output); ``axis``: its channel axis; ``bias``: the
    constant the bias correction goes to, as (node, input slot); ``scale``: what multiplies the
    consumer output on its way to ``point`` (a layer scale), ``pre``: the part of it applied
    before the bias."""

    consumer: Consumer
    point: str
    axis: int
    bias: tuple[str, int] | None
    scale: np.ndarray | float = 1.0
    pre: np.ndarray | float = 1.0
    window: Window | None = None


def _matrix(node: ir.Node, c: Consumer) -> tuple[np.ndarray, int, Window | None] | None:
    """The consumer's weight as [K, N] (a k x k conv's as [C*kh*kw, M]), its output's channel
    axis and, for a k x k conv, its window; None when it is none of these."""
    plain = consumer_matrix(node, c)
    if plain is not None:
        return plain[0], plain[1], None
    weight = const_array(node.inputs[c.weight_index])
    if node.op_type != "Conv" or weight is None or weight.ndim != 4 or c.weight_axis != 1:
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    window = Window(tuple(weight.shape[2:]), tuple(attrs.get("strides", (1, 1))),
                     tuple(attrs.get("pads", (0, 0, 0, 0))),
                     tuple(attrs.get("dilations", (1, 1))))
    return weight.reshape(weight.shape[0], -1).T, 1, window


def _plan(model: ir.Model, block: Block, c: Consumer) -> _Plan | str:
    """The refit's plan for ``block``'s consumer ``c``, or the reason it cannot be refitted. The
    residual target needs the block's removal path (its one consumer's way to the residual add);
    every other consumer is fitted to its own dense output."""
    if c.role is not Role.FLAT:
        return "its consumer reads a head axis"
    nodes = nodes_by_name(model.graph)
    node = nodes[c.node]
    if shared(model, node.inputs[c.weight_index]):
        return "its weight is shared with another layer (ALBERT): a refit of one use would " \
               "unshare it"
    matrix = _matrix(node, c)
    if matrix is None:
        return "the consumer is not a conv of group 1 or a plain matrix product"
    weight, axis, window = matrix
    width = weight.shape[1]
    own_bias = (c.node, 2) if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 \
        and node.inputs[2] is not None else None
    r = block.removal if len(block.consumers) == 1 else None
    if r is None:
        return _Plan(c, node.outputs[0].name, axis, _vector(nodes, own_bias, width),
                     window=window)
    scale, pre = np.ones(width), np.ones(width)
    for name, slot, after, inverse in r.scale_uses:
        s = const_array(nodes[name].inputs[slot])
        if s is None or s.size not in (1, width):
            return "a scale on the way to the residual add is not per channel"
        s = 1.0 / s.astype(np.float64) if inverse else s.astype(np.float64)
        scale = scale * s.reshape(-1)
        if after == 0:
            pre = pre * s.reshape(-1)
    bias = _vector(nodes, r.bias_uses[0], width) if r.bias_uses else None
    return _Plan(c, nodes[r.node].outputs[0].name, axis, bias, scale, pre)


def _vector(nodes: Mapping[str, ir.Node], use: tuple[str, int] | None,
            width: int) -> tuple[str, int] | None:
    """``use`` if it holds a constant vector of ``width`` entries (a bias a fit can move)."""
    if use is None:
        return None
    arr = const_array(nodes[use[0]].inputs[use[1]])
    return use if arr is not None and arr.shape == (width,) else None


def refit(model: ir.Model, structure: Structure, keep: Mapping[str, Sequence[int]],
          cal: CalibrationSet, held: CalibrationSet, providers: Sequence[str] | None = None,
          dampings: Sequence[float] = DAMPINGS, per_channel: bool = True) -> RefitResult:
    """A copy of ``model`` whose consumer weights and biases are refitted on ``cal`` where that
    lowers the error on ``held`` (see the module doc), one consumer at a time in graph order.
    Blocks ``keep`` does not name stay whole and are refitted too: they can absorb the error
    that reaches them. With ``per_channel``, the convs downstream of a pruned group that read
    none are fitted channel by channel in the same pass (:mod:`.channelwise`)."""
    out = copy_model(model)
    masks = unit_masks(structure, keep)
    order = {n.name: i for i, n in enumerate(out.graph)}
    # (label, the node it fits, its plan or why it has none, the block for a consumer's refit)
    jobs: list[tuple[str, str, _Plan | ChannelPlan | str, Block | None]] = [
        (b.name if len(b.consumers) == 1 else f"{b.name}@{c.node}", c.node, _plan(out, b, c), b)
        for b in structure.blocks for c in b.consumers]
    if per_channel:
        jobs += [(name, name, plan, None)
                 for name, plan in _channel_plans(out, structure, masks, order).items()]
    fits = [p for _, _, p, _ in jobs if isinstance(p, _Plan)]
    convs = [p for _, _, p, _ in jobs if isinstance(p, ChannelPlan)]
    output = model.graph.outputs[0].name
    slots = [s for p in fits for s in ((p.consumer.node, p.consumer.weight_index), p.bias) if s]
    slots += [(p.node, slot) for p in convs for slot in (1, 2)]
    session = Session(model, structure, masks, [p.consumer for p in fits], slots, providers)
    walk = session.start(cal, held)
    # The walk moves forward only: jobs in the order of their nodes in the walked model.
    jobs.sort(key=lambda job: session.position[job[1]])
    result = RefitResult(out)
    for label, node, plan, block in jobs:
        if isinstance(plan, str):
            result.blocks.append(BlockRefit(label, "none", reason=plan))
            continue
        walk.goto(session.position[node])
        got = (_fit_conv(out, session, plan, (cal, held), dampings)
               if isinstance(plan, ChannelPlan) else
               _fit_block(out, session, masks, block, plan, (cal, held), dampings))
        got.block = label
        result.blocks.append(got)
        result.gram_bytes = max(result.gram_bytes, got.gram_bytes)
    walk.drop(cal)
    walk.goto(walk.end)
    result.held_before = relative_error(walk, held, output, "baseline")
    if not any(r.method != "none" for r in result.blocks):
        result.held_after = result.held_before
        result.model = copy_model(model)
        return result
    result.held_after = relative_error(walk, held, output, "student")
    result.kept = result.held_after < result.held_before
    if not result.kept:
        result.model = copy_model(model)
    return result


def _channel_plans(model: ir.Model, structure: Structure, masks: Mapping[str, np.ndarray],
                   order: Mapping[str, int]) -> dict[str, ChannelPlan | str]:
    """{conv: its per-channel plan or why it has none} for every conv after the first consumer
    of a pruned group (before it, the pruned model computes what the dense one does) that is no
    group's consumer (those are refitted whole)."""
    pruned = [order[c.node] for b in structure.blocks if not np.all(masks[b.name] > 0)
              for c in b.consumers]
    readers = {c.node for b in structure.blocks for c in b.consumers}
    if not pruned:
        return {}
    plans: dict[str, ChannelPlan | str] = {}
    for node in model.graph:
        if node.op_type != "Conv" or node.name in readers or order[node.name] <= min(pruned):
            continue
        plans[node.name] = ("its weight is shared with another layer" if len(node.inputs) > 1
                            and shared(model, node.inputs[1]) else channel_plan(node))
    return plans


def _fit_conv(out: ir.Model, session: Session, plan: ChannelPlan,
              sets: tuple[CalibrationSet, CalibrationSet], dampings: Sequence[float]
              ) -> BlockRefit:
    """A conv fitted channel by channel (:func:`.channelwise.fit_channels`), as a report entry:
    its held-out errors are summed over its output channels."""
    got = fit_channels(out, session, plan, sets, dampings)
    kind = "depthwise" if plan.window else "affine"
    if got is None:
        return BlockRefit(plan.node, "none", reason="no channel's fit lowered its held-out error")
    choice, nbytes = got
    return BlockRefit(plan.node, f"{kind} ({choice.summary()})", choice.before, choice.after,
                      gram_bytes=nbytes)


def _fit_block(out: ir.Model, session: Session, masks: Mapping[str, np.ndarray],
               block: Block, plan: _Plan, sets: tuple[CalibrationSet, CalibrationSet],
               dampings: Sequence[float]) -> BlockRefit:
    """Fit ``plan``'s consumer on the first of ``sets`` (scoring samples), choose on the second
    (held-out), and write the winner into ``out`` and the ``session``'s feeds."""
    c = plan.consumer
    nodes = nodes_by_name(out.graph)
    node = nodes[c.node]
    weight_value = node.inputs[c.weight_index]
    weight = const_array(weight_value)
    w_full = _matrix(node, c)[0].astype(np.float64)
    # The block's kept rows of the weight; after a Concat the other groups' rows stay as they are
    # (their contribution is in the student's output, so the target of these rows is unchanged).
    kept = block.indices(np.flatnonzero(masks[block.name] > 0), c.role, c.repeat, c.offset)
    if plan.window:
        kept = (kept[:, None] * plan.window.size + np.arange(plan.window.size)).reshape(-1)
    w0 = w_full[kept]
    free = 1 if plan.bias else 0
    x_name = session.data[(c.node, c.data_index)]
    grams = []
    for data in sets:
        gram = Gram(len(kept) + free, w0.shape[1])
        pairs = zip(data.chunks, session.walk.values("student", data, [x_name, plan.point]),
                    session.walk.values("teacher", data, [plan.point]))
        for chunk, got, want in pairs:
            mask = chunk.feeds.get(MASK_INPUT)
            x = (plan.window.patches(got[x_name]) if plan.window else
                 rows(got[x_name], c.data_axis, mask))[:, kept].astype(np.float64)
            diff = (rows(want[plan.point], plan.axis, mask).astype(np.float64)
                    - rows(got[plan.point], plan.axis, mask)) / plan.scale
            gram.add(np.hstack([x, np.ones((x.shape[0], free))]), x @ w0 + diff)
        grams.append(gram)
    fit, check = grams
    chosen = choose(fit, check, w0, free, dampings)
    if chosen is None:
        before = check.error(np.vstack([w0, np.zeros((free, w0.shape[1]))]))
        return BlockRefit(block.name, "none", before, before,
                          reason="no fit lowered its held-out error",
                          gram_bytes=fit.nbytes + check.nbytes)
    method, damping, w, before, after = chosen
    w_full[kept] = w[:len(kept)]
    new = (oriented(w_full, c) if node.op_type != "Conv" else w_full.T.reshape(weight.shape))
    replace_constant(out, node, c.weight_index, new.astype(weight.dtype), weight_value.name)
    session.set((c.node, c.weight_index), new.astype(weight.dtype))
    if free:
        bnode = nodes[plan.bias[0]]
        old = const_array(bnode.inputs[plan.bias[1]])
        shifted = old.astype(np.float64) + plan.pre * w[-1]
        replace_constant(out, bnode, plan.bias[1], shifted.astype(old.dtype),
                 bnode.inputs[plan.bias[1]].name)
        session.set(plan.bias, shifted.astype(old.dtype))
    return BlockRefit(block.name, method, before, after, damping,
                      gram_bytes=fit.nbytes + check.nbytes)


def choose(fit: Gram, check: Gram, w0: np.ndarray, free: int, dampings: Sequence[float]
           ) -> tuple[str, float | None, np.ndarray, float, float] | None:
    """The candidate with the lowest held-out error (``check``), fitted on ``fit``: FLAP's bias
    compensation (with a bias row, ``free`` = 1) and a ridge solve per damping; as (method,
    damping, weight rows with the bias row last, held-out error before, after), or None when
    none lowers the held-out error of the weights as they are (``w0``, bias unchanged) by more
    than rounding (:data:`NOISE`)."""
    base = np.vstack([w0, np.zeros((free, w0.shape[1]))])
    candidates: list[tuple[str, float | None, np.ndarray]] = []
    if free and fit.rows:
        shift = (fit.at[-1] - fit.aa[-1, :-1] @ w0) / fit.rows
        candidates.append(("bias", None, np.vstack([w0, shift])))
    candidates += [("ridge", d, ridge(fit, base, d, free)) for d in dampings]
    candidates = [c for c in candidates if np.all(np.isfinite(c[2]))]
    if not candidates:
        return None
    before = check.error(base)
    method, damping, w = min(candidates, key=lambda cand: check.error(cand[2]))
    after = check.error(w)
    # The errors come from accumulated sums: a gain below the rounding of the target's own
    # squared norm (a block with nothing to correct) is noise, not a better fit.
    gain = before - after
    return (method, damping, w, before, after) if gain > NOISE * check.tt else None
