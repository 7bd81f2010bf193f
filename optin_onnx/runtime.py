"""onnxruntime for every stage and every tool: the one place that opens and runs sessions.

Callers differ in three settings, each an argument of :func:`session` rather than a helper of its
own: ``outputs`` (the probe, the activation capture and the scorers read intermediate values, so
the session returns those instead of the graph outputs), ``optimize`` (off where every value must
exist as written in the graph, on where the model is timed or evaluated as a user would run it)
and ``threads``.

Protobuf cannot serialise a message over 2 GB, so a large model is written once to a private
temporary directory with its weights as external data and the session is opened from that path.
"""
from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from threadpoolctl import threadpool_limits

from optin_onnx.errors import OptinError

@contextmanager
def outputs_set(model: onnx.ModelProto, outputs: Sequence[str] | None) -> Iterator[None]:
    """``model``'s graph outputs are ``outputs`` (any values, in that order) inside the block and
    as they were after it; an output the graph already declares keeps its declared type. Changed
    in place rather than on a copy: a copy of a large model is its size again in memory, on top
    of the serialised bytes and onnxruntime's own copy."""
    if outputs is None:
        yield
        return
    saved = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in model.graph.output]
    declared = {o.name: o for o in saved}
    del model.graph.output[:]
    for name in outputs:
        model.graph.output.append(declared.get(name) or onnx.ValueInfoProto(name=name))
    try:
        yield
    finally:
        del model.graph.output[:]
        model.graph.output.extend(saved)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every tensor ``model`` stores (initializers and tensor attributes, subgraphs
    included), from their shapes: what a model weighs, measured without serialising it
    (protobuf's ``ByteSize`` serialises the whole model to count, and raises past 2 GB)."""

    def size(t: onnx.TensorProto) -> int:
        if t.data_type == onnx.TensorProto.STRING:
            return sum(len(v) for v in t.string_data)
        return int(np.prod(t.dims, dtype=np.int64)) * \
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    def graph(g: onnx.GraphProto) -> int:
        total = sum(size(t) for t in g.initializer)
        for node in g.node:
            for a in node.attribute:
                total += (size(a.t) if a.type == onnx.AttributeProto.TENSOR else
                          sum(size(t) for t in a.tensors))
                total += sum(graph(sub) for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH
                                                    else a.graphs))
        return total

    return graph(model.graph)


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``). Sessions and
    serialised models are freed when dropped, but glibc keeps the pages, so without this the
    resident memory after one large transient stays as high as its peak and the next stage's
    peak stacks on top. No ``gc.collect()`` first: what stages drop is freed by reference counts,
    and a full collection in a process holding many objects costs more than the trim. A no-op
    where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (its ``malloc_trim`` and ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


#: glibc's mallopt parameters, and the values :func:`heap_kept` sets while it holds: large blocks
#: from the heap (not a mapping of their own) and no automatic trim, so what a run frees is there
#: for the next run.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1}
#: What they are set back to: where glibc's own adjustment takes them once a block of 32 MiB or
#: more has been freed (its ceiling), which every prune does. glibc stops adjusting them once set.
_AFTER = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_kept_depth = 0


def _mallopt(values: Mapping[int, int]) -> bool:
    libc = _glibc()
    return libc is not None and all(libc.mallopt(k, v) == 1 for k, v in values.items())


def keep_freed_heap() -> bool:
    """Keep freed memory in this process's heap from now on (True where the C library is glibc
    and took the setting). For a process that exists to run the work (a scoring worker); the
    caller's own process uses :func:`heap_kept`, which ends."""
    return _mallopt(_KEPT)


@contextmanager
def heap_kept() -> Iterator[None]:
    """Inside the block, memory a run frees stays in the heap for the next run.

    The sessions that run many times on large inputs (candidate runs, the capture, the refit's
    segments) have no onnxruntime arena, to bound peak memory, so each run mallocs its tensors and
    frees them at its end. glibc maps every block over its threshold (at most 32 MiB) on its own
    and unmaps it when freed, and trims the heap's top past another: the next run faults every
    page in again (what that costs a candidate run: docs/RESULTS.md, "One-off measurements").
    Here large blocks come from the heap and nothing is trimmed by itself; :func:`release_memory`
    still hands free pages back between blocks and stages, and does so on leaving. Blocks nest
    (the outermost sets and restores). A no-op where the C library is not glibc."""
    global _kept_depth
    if _kept_depth == 0 and not keep_freed_heap():
        yield
        return
    _kept_depth += 1
    try:
        yield
    finally:
        _kept_depth -= 1
        if _kept_depth == 0:
            _mallopt(_AFTER)
            release_memory()


def one_blas_thread() -> threadpool_limits:
    """numpy's BLAS runs on one thread from now on; use it as a context manager to limit only a
    block (it restores the previous limits on leaving).

    For the loops that alternate onnxruntime runs and numpy products (the candidate runs and
    their Gram matrices): a BLAS pool of several threads keeps them spinning after each product,
    and they take the cores from onnxruntime's next run (measured in docs/RESULTS.md, "One-off
    measurements"). The products are small enough that one thread loses little."""
    return threadpool_limits(limits=1, user_api="blas")


def session(model: onnx.ModelProto | str | os.PathLike, providers: Sequence[str] | None = None,
            *, outputs: Sequence[str] | None = None, optimize: bool = True,
            threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """Open ``model`` (a proto or a path) on ``providers`` (default: CPU).

    ``outputs``: return these values (any intermediate ones) instead of the graph outputs (a
    proto only). ``optimize=False`` keeps every value as written (the probe and the batch-axis
    measurement need the unfused graph's intermediate values); otherwise onnxruntime optimises
    fully. ``threads``: intra-op threads (default: onnxruntime's choice). ``arena=False``: no CPU
    memory arena, so each run's buffers go back when it ends; the arena grows in steps and keeps
    its largest size, which on the scorers' stacked runs cost 0.7-0.8 GiB of peak memory for
    0-5 % of speed (docs/RESULTS.md, "Real-size models")."""
    so = ort.SessionOptions()
    # Fatal only: a failed run raises with the same message, which the caller words (or skips, as
    # verify does for shapes the input model cannot take); a logged copy would precede it on stderr.
    so.log_severity_level = 4
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                   ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = arena
    providers = list(providers or ["CPUExecutionProvider"])
    if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
        raise OptinError(f"model file not found: {model}")
    if outputs is not None and not isinstance(model, onnx.ModelProto):
        raise OptinError("internal: choosing a session's outputs needs the model in memory")
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(str(model), so, providers=providers)
        with outputs_set(model, outputs):
            # Serialised directly: protobuf's ByteSize would serialise it once more to measure
            # it, and raises the same error as serialising past 2 GB.
            try:
                data = model.SerializeToString()
            except (EncodeError, ValueError):
                data = None
                copy = onnx.ModelProto()
                copy.CopyFrom(model)
        if data is not None:
            return ort.InferenceSession(data, so, providers=providers)
        with tempfile.TemporaryDirectory(prefix="optin-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise OptinError(f"onnxruntime could not load the model: {str(exc).splitlines()[0]}") from exc


def run_all_values(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                   names: Sequence[str] | None = None,
                   providers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` once returning its graph outputs and the requested intermediate values (all
    node outputs by default), by name.

    Graph optimisations are disabled so that every value exists as written in the graph, and a
    run that fails says so as an :class:`OptinError` (this is the first run a user's model gets).
    """
    wanted = names if names is not None else [o for n in model.graph.node for o in n.output if o]
    outputs = list(dict.fromkeys([o.name for o in model.graph.output] + list(wanted)))
    sess = session(model, providers, outputs=outputs, optimize=False)
    try:
        values = sess.run(outputs, dict(feeds))
    except Exception as exc:  # onnxruntime raises several unrelated types
        detail = " ".join(str(exc).split())[:400]
        raise OptinError(f"onnxruntime could not run the model: {detail}") from exc
    return dict(zip(outputs, values))


def first_output(sess: ort.InferenceSession, batches: Iterable[Mapping[str, np.ndarray]]
                 ) -> np.ndarray:
    """``sess``'s first output on each feed dict of ``batches``, concatenated along axis 0.

    Feeds the session does not take are left out, so one dict serves every variant of a model."""
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate([sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
                           for feeds in batches])


def run_batched(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
                batch: int, providers: Sequence[str] | None = None) -> np.ndarray:
    """``model``'s first output on ``feeds`` (first axis = sample), ``batch`` samples per run,
    concatenated: evaluating a whole data set without holding all its activations at once."""
    n = next(iter(feeds.values())).shape[0]
    return first_output(session(model, providers),
                        ({k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)))
