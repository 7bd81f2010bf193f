"""Per-output-channel fits of the convs the layer-wise refit does not reach: the convs that read
no pruned channel group but whose input pruning changed (a depthwise conv inside a pruned
inverted-residual block, any conv downstream of a pruned group).

Each output channel c of such a conv is its own least-squares problem over the rows A_c of one
basis, with the conv's current parameters w0_c in that basis and the dense model's output of the
channel as the target (before the activation that follows):

- a depthwise conv (group == channels, one input channel per output channel): A_c is the
  channel's own k x k input patch and a one, w0_c its k*k weights and its bias; a ridge refit of
  w_c is exact to set up and costs a (k*k+1)^2 Gram matrix per channel;
- any other conv: A_c is the channel's output in the pruned model and a one, w0_c = (1, 0); a fit
  here is the per-channel affine correction a * y_c + d, folded into the channel's weights
  (times a) and bias (a * b + d).

Candidates per channel: *moments* (the retraining-free analogue of re-estimating BatchNorm
statistics on folded weights: a and d that give the channel the dense model's mean and variance
on the calibration set) and a ridge solve per damping (damped toward w0, the bias free). As in the
layer-wise refit (:mod:`optin_onnx.reconstruct.layerwise`), the fit is made on the scoring samples
and each channel keeps the candidate with the lowest error on the held-out samples only where it
lowers that error; the whole model's held-out check then covers these fits too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.calibrate import CalibrationSet
from optin_onnx.graph import const_array, nodes_by_name
from optin_onnx.reconstruct.session import Session, Window, replace_constant

#: Per-channel gains smaller than this fraction of the channel target's squared norm are
#: rounding noise (as :data:`optin_onnx.reconstruct.layerwise.NOISE` for a block).
NOISE = 1e-9
#: The per-channel rows of a chunk's samples are built this many bytes at a time (a depthwise
#: conv's 3 x 3 patches on a 112 x 112 map are 9 values per position and channel).
BASIS_BYTES = 1 << 26


class ChannelGram:
    """Per output channel c: A_c^T A_c [C, k, k], A_c^T t_c [C, k], t_c^T t_c [C], in float64
    (the per-channel counterpart of :class:`~optin_onnx.reconstruct.gram.Gram`)."""

    def __init__(self, channels: int, k: int) -> None:
        self.aa = np.zeros((channels, k, k))
        self.at = np.zeros((channels, k))
        self.tt = np.zeros(channels)

    def add(self, a: np.ndarray, t: np.ndarray) -> None:
        """Accumulate rows ``a`` [C, k, r] with targets ``t`` [C, r] (channel-major, so that
        every channel's products are one batched matrix multiplication)."""
        a = np.asarray(a, np.float64)
        t = np.asarray(t, np.float64)
        self.aa += a @ a.transpose(0, 2, 1)
        self.at += (a @ t[:, :, None])[:, :, 0]
        self.tt += np.einsum("cr,cr->c", t, t)

    @property
    def nbytes(self) -> int:
        return self.aa.nbytes + self.at.nbytes

    def error(self, w: np.ndarray) -> np.ndarray:
        """||A_c w_c - t_c||^2 per channel, for ``w`` [C, k]."""
        return (np.einsum("ck,ckl,cl->c", w, self.aa, w) - 2.0 * np.einsum("ck,ck->c", w, self.at)
                + self.tt)


def moments(gram: ChannelGram, w0: np.ndarray) -> np.ndarray:
    """a * w0 + d on the bias row (the last), per channel: the affine map that gives each
    channel's output the mean and variance of its target over the accumulated rows (a = 1 where
    the output is constant: there is no spread to scale)."""
    n = gram.aa[:, -1, -1]
    safe = np.maximum(n, 1.0)
    mean_y = np.einsum("ck,ck->c", gram.aa[:, -1, :], w0) / safe
    var_y = np.einsum("ck,ckl,cl->c", w0, gram.aa, w0) / safe - mean_y ** 2
    mean_t = gram.at[:, -1] / safe
    var_t = np.maximum(gram.tt / safe - mean_t ** 2, 0.0)
    flat = var_y <= 1e-12 * np.maximum(var_t, 1e-30)
    a = np.where(flat, 1.0, np.sqrt(var_t / np.where(flat, 1.0, var_y)))
    w = a[:, None] * w0
    w[:, -1] += mean_t - a * mean_y
    return w


def ridge_channels(gram: ChannelGram, w0: np.ndarray, damping: float) -> np.ndarray:
    """Per channel, argmin ||A_c w - t_c||^2 + lam_c ||w - w0_c||^2 over all rows but the bias
    (the last), lam_c = ``damping`` times the mean of the channel's penalised diagonal (relative,
    as :func:`optin_onnx.reconstruct.gram.ridge`); a channel whose system is singular gets its
    least-squares solution."""
    k = gram.aa.shape[1]
    pen = np.ones(k)
    pen[-1] = 0.0
    diag = np.einsum("ckk->ck", gram.aa)[:, :-1]
    scale = diag.mean(1) if k > 1 else np.zeros(len(gram.aa))
    lam = damping * np.where(scale > 0, scale, 1.0)
    lhs = gram.aa + lam[:, None, None] * np.diag(pen)
    rhs = gram.at + lam[:, None] * pen * w0
    try:
        return np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(lhs) @ rhs[:, :, None])[:, :, 0]


@dataclass
class ChannelChoice:
    """Each channel's new parameters ``w`` [C, k] (w0 where nothing won), the winning candidate
    per channel (``""``: none), and the held-out errors summed over channels, before and after."""

    w: np.ndarray
    method: list[str]
    before: float
    after: float

    def summary(self) -> str:
        """How many channels took which candidate, as the report words it."""
        won = [m for m in self.method if m]
        counts = ", ".join(f"{m} {won.count(m)}" for m in dict.fromkeys(won))
        return f"{len(won)} of {len(self.method)} channels: {counts}"


def choose_channels(fit: ChannelGram, check: ChannelGram, w0: np.ndarray,
                    dampings: Sequence[float]) -> ChannelChoice:
    """Per channel, the candidate fitted on ``fit`` with the lowest error on ``check``: the
    moment match and a ridge solve per damping, kept only where it lowers the held-out error of
    ``w0`` by more than rounding (:data:`NOISE`)."""
    candidates = [("moments", moments(fit, w0))]
    candidates += [(f"ridge {d:g}", ridge_channels(fit, w0, d)) for d in dampings]
    before = check.error(w0)
    errors = np.stack([np.where(np.all(np.isfinite(w), 1), check.error(w), np.inf)
                       for _, w in candidates])
    best = np.argmin(errors, 0)
    after = errors[best, np.arange(len(best))]
    won = before - after > NOISE * check.tt
    w = w0.copy()
    method = [""] * len(w0)
    for c in np.flatnonzero(won):
        w[c] = candidates[best[c]][1][c]
        method[c] = candidates[best[c]][0]
    return ChannelChoice(w, method, float(before.sum()), float(np.where(won, after, before).sum()))


@dataclass(frozen=True)
class ChannelPlan:
    """A conv fitted channel by channel: its input and output values, and for a depthwise conv
    its window (None: the affine correction of its output)."""

    node: str
    data: str
    point: str
    window: Window | None


def channel_plan(node: ir.Node) -> ChannelPlan | str:
    """The per-channel plan of conv ``node``, or why it has none (a constant 4-D weight and a
    constant bias are needed: the fits move both)."""
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 4:
        return "its weight is not a constant 4-D kernel"
    if len(node.inputs) < 3 or node.inputs[2] is None or const_array(node.inputs[2]) is None:
        return "it has no constant bias to move"
    attrs = {k: a.value for k, a in node.attributes.items()}
    group = attrs.get("group", 1)
    window = None
    if group > 1 and group == weight.shape[0] and weight.shape[1] == 1 \
            and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"):
        window = Window(tuple(weight.shape[2:]), tuple(attrs.get("strides", (1, 1))),
                        tuple(attrs.get("pads", (0, 0, 0, 0))),
                        tuple(attrs.get("dilations", (1, 1))))
    return ChannelPlan(node.name, node.inputs[0].name, node.outputs[0].name, window)


def _basis(plan: ChannelPlan, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples' rows per channel, float64 [C, k, samples * positions]: a depthwise conv's
    k x k patches of its input ``x`` [B, C, H, W], else the pruned model's output ``y``
    [B, C, Ho, Wo]; a row of ones last (the bias). Rows in (sample, position) order, as
    :func:`_targets`."""
    channels = y.shape[1]
    if plan.window is None:
        cols = y.transpose(1, 0, 2, 3).reshape(channels, 1, -1)
    else:
        cols = plan.window.patches(x).reshape(-1, channels, plan.window.size).transpose(1, 2, 0)
    out = np.empty((channels, cols.shape[1] + 1, cols.shape[2]))
    out[:, :-1] = cols
    out[:, -1] = 1.0
    return out


def _targets(t: np.ndarray) -> np.ndarray:
    """The dense output [B, C, Ho, Wo] as [C, samples * positions], in :func:`_basis`' order."""
    return t.transpose(1, 0, 2, 3).reshape(t.shape[1], -1)


def fit_channels(out: ir.Model, session: Session, plan: ChannelPlan,
                 sets: tuple[CalibrationSet, CalibrationSet], dampings: Sequence[float]
                 ) -> tuple[ChannelChoice, int] | None:
    """Fit ``plan``'s conv on the first of ``sets``, choose per channel on the second, and write
    the winners into ``out`` and the ``session``'s feeds; (the choice, the Gram bytes), or None
    where no channel gained."""
    node = nodes_by_name(out.graph)[plan.node]
    weight, bias = const_array(node.inputs[1]), const_array(node.inputs[2])
    channels = weight.shape[0]
    if plan.window is None:
        w0 = np.tile([1.0, 0.0], (channels, 1))
    else:
        w0 = np.hstack([weight.reshape(channels, -1), bias[:, None]]).astype(np.float64)
    grams = []
    for data in sets:
        gram = ChannelGram(channels, w0.shape[1])
        for got, want in zip(session.walk.values("student", data, [plan.data, plan.point]),
                             session.walk.values("teacher", data, [plan.point])):
            x, y, t = got[plan.data], got[plan.point], want[plan.point]
            # As many samples at once as keep the float64 basis under BASIS_BYTES.
            step = max(1, BASIS_BYTES // (8 * w0.size * y[0, 0].size))
            for i in range(0, len(y), step):
                gram.add(_basis(plan, x[i:i + step], y[i:i + step]), _targets(t[i:i + step]))
        grams.append(gram)
    choice = choose_channels(*grams, w0, dampings)
    if not any(choice.method):
        return None
    if plan.window is None:
        a, d = choice.w[:, 0], choice.w[:, 1]
        new_w = weight * a.reshape(-1, 1, 1, 1)
        new_b = bias * a + d
    else:
        new_w = choice.w[:, :-1].reshape(weight.shape)
        new_b = choice.w[:, -1]
    for slot, arr, old in ((1, new_w, weight), (2, new_b, bias)):
        arr = np.asarray(arr).astype(old.dtype)
        replace_constant(out, node, slot, arr, node.inputs[slot].name)
        session.set((plan.node, slot), arr)
    return choice, grams[0].nbytes + grams[1].nbytes
