"""Stage *calibrate*: run the dense model in onnxruntime and keep the activations scoring needs.

The calibration set is processed in chunks of samples; each chunk is cut to its longest real
sequence (trailing all-padding columns change nothing a mask can see), which saves work on short
texts. Which axis of each captured tensor is the batch axis is *measured* (two probe runs at
different batch sizes), so candidates can later be stacked along it whatever the layout.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import onnx

from optin_onnx import runtime
from optin_onnx.errors import OptinError

MASK_INPUT = "attention_mask"


@dataclass
class Chunk:
    start: int
    stop: int
    feeds: dict[str, np.ndarray]

    @property
    def seq_len(self) -> int:
        return next(iter(self.feeds.values())).shape[1] if self.feeds else 0


@dataclass
class CalibrationSet:
    """Calibration inputs (first axis = sample) and which token positions are real."""

    feeds: dict[str, np.ndarray]
    token_mask: np.ndarray  # [N, S] bool
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.token_mask.shape[0]

    @property
    def mean_length(self) -> float:
        return float(self.token_mask.sum(1).mean())

    def mapped(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
               ) -> CalibrationSet:
        """The same samples and chunks with ``fn`` applied to every feed dict (a pruned model's
        inputs: see :func:`optin_onnx.analysis.pruned_feeds`)."""
        return CalibrationSet(fn(self.feeds), self.token_mask,
                              [Chunk(c.start, c.stop, fn(c.feeds)) for c in self.chunks])


def make_calibration(feeds: dict[str, np.ndarray], chunk_size: int = 16) -> CalibrationSet:
    """Wrap calibration arrays; an ``attention_mask`` input (if any) marks padding."""
    n = {a.shape[0] for a in feeds.values()}
    if len(n) != 1:
        raise OptinError(f"calibration arrays disagree on the number of samples: {sorted(n)}")
    n_samples = n.pop()
    mask = feeds.get(MASK_INPUT)
    seq_inputs = [k for k, a in feeds.items() if a.ndim >= 2 and mask is not None
                  and a.shape[:2] == mask.shape[:2]]
    if mask is not None:
        token_mask = mask.astype(bool)
    else:
        first = next(iter(feeds.values()))
        token_mask = np.ones(first.shape[:2] if first.ndim >= 2 else (n_samples, 1), dtype=bool)
    cal = CalibrationSet(feeds, token_mask)
    for start in range(0, n_samples, chunk_size):
        stop = min(start + chunk_size, n_samples)
        chunk = {k: a[start:stop] for k, a in feeds.items()}
        if mask is not None and len(seq_inputs) == len(feeds):
            length = max(1, int(token_mask[start:stop].sum(1).max()))
            length = max(length, int(np.max(np.nonzero(token_mask[start:stop].any(0))[0]) + 1))
            chunk = {k: np.ascontiguousarray(a[:, :length]) for k, a in chunk.items()}
        cal.chunks.append(Chunk(start, stop, chunk))
    return cal


def subset(cal: CalibrationSet, index: np.ndarray, chunk_size: int = 16) -> CalibrationSet:
    return make_calibration({k: a[index] for k, a in cal.feeds.items()}, chunk_size)


def capture(model: onnx.ModelProto, cal: CalibrationSet, names: list[str],
            providers: list[str] | None = None, extra: dict[str, np.ndarray] | None = None,
            keep: Collection[str] | None = None,
            each: Callable[[dict[str, np.ndarray]], None] | None = None
            ) -> list[dict[str, np.ndarray]]:
    """Dense activations ``names`` for every chunk of the calibration set (``extra``: inputs
    that are not calibration data, such as all-ones masks, fed to every chunk). ``each`` sees
    every chunk's values as they come; only ``keep`` (default: all of ``names``) are kept, so a
    value a statistic needs need not be held for the whole set."""
    sess = runtime.session(model, providers, outputs=names, arena=False)
    out = []
    for chunk in cal.chunks:
        values = dict(zip(names, sess.run(names, {**chunk.feeds, **(extra or {})})))
        if each is not None:
            each(values)
        out.append(values if keep is None else {k: v for k, v in values.items() if k in keep})
    return out


def batch_axes(model: onnx.ModelProto, cal: CalibrationSet, names: list[str]) -> dict[str, int | None]:
    """For each value, the axis that grows with the batch (None: batch-independent).

    Measured with two runs (1 and 2 samples of the first chunk) instead of assumed to be axis 0.
    """
    chunk = cal.chunks[0].feeds
    take = {k: np.concatenate([a[:1], a[:1]]) for k, a in chunk.items()}
    one = runtime.run_all_values(model, {k: a[:1] for k, a in chunk.items()}, names=names)
    two = runtime.run_all_values(model, take, names=names)
    axes: dict[str, int | None] = {}
    for name in names:
        s1, s2 = np.shape(one[name]), np.shape(two[name])
        diff = [i for i, (a, b) in enumerate(zip(s1, s2)) if a != b]
        if len(diff) > 1 or len(s1) != len(s2):
            raise OptinError(f"cannot tell the batch axis of '{name}' ({s1} vs {s2})")
        axes[name] = diff[0] if diff else None
    return axes


GIB = 2 ** 30

#: The share of ``--max-memory-gib`` one calibration chunk's activations may take in a candidate
#: run; the rest holds the dense cache, the model and its suffixes, and onnxruntime's arenas.
CHUNK_SHARE = 0.25
#: Without ``--max-memory-gib``: the most one candidate run may stack, counted as every value of
#: its one-sample forward passes summed (a measure about ten times the run's live memory, which
#: onnxruntime reuses as nodes finish). 10 GiB keeps the requested 16 samples x 4 candidates for
#: MiniLM (36 MiB per sample at 64 tokens) and BERT-base (133 MiB) and halves the chunks of a
#: DINOv2-S-size model at 224 px (300 MiB), whose runs of 64 images set the prune's peak
#: (docs/RESULTS.md, "Real-size models").
DEFAULT_RUN_BYTES = 10 * 2 ** 30


@dataclass(frozen=True)
class Chunking:
    """How scoring splits its work to fit a memory limit: samples per calibration chunk and
    candidates stacked per suffix run, and the measurement they were chosen from."""

    chunk_size: int
    candidates_per_run: int
    sample_bytes: int  # every value of one forward pass of one sample at the longest sequence
    limit_bytes: int | None

    def describe(self) -> str:
        limit = "no memory limit" if self.limit_bytes is None else \
            f"--max-memory-gib {self.limit_bytes / GIB:g}"
        return (f"calibration chunks of {self.chunk_size} samples, {self.candidates_per_run} "
                f"candidates per run ({limit}; one sample's forward pass holds "
                f"{self.sample_bytes / 2**20:.1f} MiB of values)")


def chunking(model: onnx.ModelProto, arrays: dict[str, np.ndarray], chunk_size: int,
             candidates_per_run: int, limit_bytes: int | None) -> Chunking:
    """Samples per chunk and candidates per run under ``limit_bytes``.

    A candidate run stacks ``candidates_per_run`` copies of a chunk through a suffix of the model,
    so its activations grow with their product; that product is cut until every value of so many
    one-sample forward passes (measured once, on the longest calibration sample) fits in
    :data:`CHUNK_SHARE` of the limit, chunks first (fewer samples per run cost less speed than
    fewer candidates per run). Without a limit the same cut keeps a run within
    :data:`DEFAULT_RUN_BYTES`, which leaves the requested sizes to models of up to BERT-base
    width at 64 tokens."""
    longest = int(np.argmax(arrays[MASK_INPUT].sum(1))) if MASK_INPUT in arrays else 0
    values = runtime.run_all_values(model, {k: a[longest:longest + 1] for k, a in arrays.items()})
    sample = sum(v.nbytes for v in values.values() if isinstance(v, np.ndarray))
    budget = DEFAULT_RUN_BYTES if limit_bytes is None else CHUNK_SHARE * limit_bytes
    fit = max(1, int(budget // max(1, sample)))
    per_run = min(candidates_per_run, fit)
    return Chunking(max(1, min(chunk_size, fit // per_run)), per_run, sample, limit_bytes)


def check_cache_fits(model: onnx.ModelProto, cal: CalibrationSet, names: list[str],
                     limit_bytes: int | None, copies: int,
                     extra: dict[str, np.ndarray] | None = None) -> None:
    """Refuse in one line a dense cache of ``names`` (its size from a one-sample run scaled to the
    calibration set's samples and lengths) that, with the model, held by ``copies`` processes
    (each holding the scoring job), exceeds ``limit_bytes`` (None: no limit, nothing run).
    Checked before the capture, so a run that cannot fit stops in seconds instead of swapping
    for minutes."""
    if limit_bytes is None:
        return
    first = cal.chunks[0]
    one = runtime.run_all_values(model, {**{k: a[:1] for k, a in first.feeds.items()},
                                         **(extra or {})}, names=names)
    per_sample = sum(one[n].nbytes for n in names)
    text = MASK_INPUT in cal.feeds
    scale = sum((c.stop - c.start) * (c.seq_len / first.seq_len if text else 1.0)
                for c in cal.chunks)
    cache = int(per_sample * scale)
    weights = runtime.tensor_bytes(model)
    need = copies * (cache + weights)
    if need > limit_bytes:
        raise OptinError(
            f"scoring needs about {need / GIB:.3g} GiB ({copies} x ({cache / GIB:.3g} GiB of cached "
            f"activations of {len(names)} values for {cal.n} samples + {weights / GIB:.3g}"
            f" GiB of model)), over --max-memory-gib {limit_bytes / GIB:g}: use fewer --samples, "
            f"fewer --workers or a larger limit")
