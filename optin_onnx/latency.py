"""Latency: timing onnxruntime sessions, alone or two against each other.

Shared by the report (dense vs pruned, per latency case) and the simplify stage (is onnxsim's graph
faster?), so both decisions rest on the same protocol: warm-up runs, a time budget, medians, and
two models timed interleaved so that a shared machine's noise lands on both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from optin_onnx.errors import OptinError
from optin_onnx.runtime import session


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed runs of one session, in milliseconds.

    The median is the headline figure because it ignores the occasional scheduler hiccup on a shared
    machine; p90 shows how bad those hiccups are; the mean is kept for comparison with other tools.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int


def measure_latency(
    model: onnx.ModelProto | str | Path,
    feeds: dict[str, np.ndarray],
    *,
    providers: list[str] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float = 20.0,
    threads: int | None = None,
) -> LatencyStats:
    """Time one model on ``feeds`` with onnxruntime at full graph optimisation.

    ``warmup`` untimed runs let the allocator and thread pool settle; then up to ``repeats`` timed
    runs follow. Measuring stops early once ``max_seconds`` (warm-up included) is spent, after at
    least three timed runs, so a slow model on a small machine cannot stall the tool. Pass a path
    rather than a ``ModelProto`` for models with external data, so onnxruntime can find it.
    """
    sess = session(model, providers, threads=threads)
    return _time_sessions([sess], [feeds], warmup, repeats, max_seconds)[0]


def compare_latency(
    dense: onnx.ModelProto | str | Path,
    pruned: onnx.ModelProto | str | Path,
    feeds: dict[str, np.ndarray],
    *,
    providers: list[str] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float = 20.0,
    threads: int | None = None,
    pruned_feeds: dict[str, np.ndarray] | None = None,
) -> tuple[LatencyStats, LatencyStats]:
    """Time the dense and the pruned model against each other; returns ``(dense, pruned)``.

    Runs alternate (dense, pruned, dense, pruned, ...) so that both models see the same machine
    state: on a shared two-core box, load from other processes or CPU frequency changes would
    otherwise land on whichever model happened to be timed second and bias the speed-up.
    ``max_seconds`` bounds both models together; ``pruned_feeds`` are the pruned model's inputs
    where they differ (a KV cache with fewer heads); the other arguments are as for
    :func:`measure_latency`.
    """
    sessions = [session(m, providers, threads=threads) for m in (dense, pruned)]
    before, after = _time_sessions(sessions, [feeds, pruned_feeds or feeds], warmup, repeats,
                                   max_seconds)
    return before, after


def latency_entry(before: LatencyStats, after: LatencyStats) -> dict[str, float]:
    """The :attr:`~optin_onnx.report.Report.latency` value for one case: medians and their ratio.

    The speed-up uses medians for the reason given on :class:`LatencyStats`.
    """
    return {
        "before_ms": before.median_ms,
        "after_ms": after.median_ms,
        "speedup": before.median_ms / after.median_ms,
    }


def _time_sessions(
    sessions: list[ort.InferenceSession],
    feeds: list[dict[str, np.ndarray]],
    warmup: int,
    repeats: int,
    max_seconds: float,
) -> list[LatencyStats]:
    """Run ``sessions`` round-robin, each on its own ``feeds``, and summarise each one's timed
    runs."""
    if warmup < 0 or repeats < 1 or not max_seconds > 0:
        raise OptinError(
            f"latency needs warmup >= 0, repeats >= 1 and max_seconds > 0 "
            f"(got warmup={warmup}, repeats={repeats}, max_seconds={max_seconds})"
        )
    for sess, inputs in zip(sessions, feeds):
        _check_feeds(sess, inputs)
    min_runs = min(3, repeats)
    start = time.perf_counter()
    for _ in range(warmup):
        for sess, inputs in zip(sessions, feeds):
            sess.run(None, inputs)
        if time.perf_counter() - start >= max_seconds:
            break
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(repeats):
        for sess, inputs, samples in zip(sessions, feeds, times):
            t0 = time.perf_counter()
            sess.run(None, inputs)
            samples.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_runs and time.perf_counter() - start >= max_seconds:
            break
    return [
        LatencyStats(
            median_ms=statistics.median(samples),
            p90_ms=float(np.percentile(samples, 90)),
            mean_ms=statistics.fmean(samples),
            runs=len(samples),
        )
        for samples in times
    ]


def _check_feeds(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
    """Fail with the expected and given input names rather than onnxruntime's bare message."""
    expected = {i.name for i in sess.get_inputs()}
    if expected != set(feeds):
        raise OptinError(
            f"latency feeds {sorted(feeds)} do not match the model inputs {sorted(expected)}"
        )
