"""Prefix reuse: the part of the graph a candidate can change, as a model of its own.

Masking a unit of block b changes nothing before b's consumer. The suffix model starts at the
consumer's output (fed the rank-k-updated dense value) and computes only what lies downstream of
it. Every other value it needs is either

- a float tensor computed before the cut (the residual stream, the attention bias): fed from the
  dense run's cache; or
- an integer/bool value (shape arithmetic, masks): recomputed inside the suffix from the graph
  inputs, because shape values such as the batch size must follow the stacked batch of candidates.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from optin_onnx.calibrate import CalibrationSet, Chunk
from optin_onnx.errors import OptinError
from optin_onnx.runtime import release_memory, run_all_values, session


def value_dtypes(proto: onnx.ModelProto, cal: CalibrationSet,
                 extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.dtype]:
    """The element type of every value of ``proto`` (what :func:`build_suffix` needs), from one
    run on the first calibration sample (``extra``: inputs that are not calibration data)."""
    feeds = {**{k: a[:1] for k, a in cal.chunks[0].feeds.items()}, **(extra or {})}
    values = run_all_values(proto, feeds)
    out = {k: v.dtype for k, v in values.items()}
    out.update({k: a.dtype for k, a in feeds.items()})
    return out


@dataclass
class Suffix:
    model: onnx.ModelProto | None  # None once a session holds it (a copy of downstream weights)
    start: str
    cut: list[str]  # float values fed from the dense cache
    graph_inputs: list[str]  # original graph inputs the suffix recomputes from
    outputs: list[str]


def _trace(model: onnx.ModelProto, start: str, outputs: list[str], dtypes: dict[str, np.dtype]
           ) -> tuple[list[onnx.NodeProto], list[str], set[str], set[str]]:
    """(the nodes the suffix runs, the values fed from the cache, the graph inputs and the
    initializers it reads)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    downstream = {start}
    static = set(inits)  # values computed from constants alone: cheap and batch-free, recompute
    for n in g.node:
        if any(i in downstream for i in (*n.input, *implicit_inputs(n))):
            downstream.update(o for o in n.output if o)
        if all(not i or i in static for i in n.input):
            static.update(o for o in n.output if o)
    missing = [o for o in outputs if o not in downstream]
    if missing:
        raise OptinError(f"internal: outputs {missing} do not depend on '{start}'")
    keep_nodes, used_inputs, used_inits, cut = _upstream(
        g, outputs, lambda v: v not in downstream and v not in static
        and np.issubdtype(dtypes[v], np.floating), fed={start})
    nodes = [g.node[i] for i in keep_nodes]
    # A node kept for one output (onnxruntime's EmbedLayerNormalization: the embeddings, float,
    # and a mask index, int) computes its other outputs too: they are recomputed, not fed.
    cut -= {o for n in nodes for o in n.output}
    # Subgraph attributes (If/Loop) may read outer values: those must be available too.
    for n in nodes:
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise OptinError(f"control flow op {n.op_type} '{n.name}' inside the scored region")
    return nodes, sorted(cut), used_inputs, used_inits


def suffix_cut(model: onnx.ModelProto, start: str, outputs: list[str],
               dtypes: dict[str, np.dtype]) -> list[str]:
    """The cached values :func:`build_suffix` would feed, without building the model: what the
    dense capture must keep, known before any suffix (a copy of its weights) exists."""
    return _trace(model, start, outputs, dtypes)[1]


def build_suffix(model: onnx.ModelProto, start: str, outputs: list[str],
                 dtypes: dict[str, np.dtype]) -> Suffix:
    """Extract the sub-model that maps ``start`` (plus cached values) to ``outputs``.

    ``dtypes`` gives the element type of every value (from a probe run); it decides what is cut
    (float) and what is recomputed (everything else).
    """
    g = model.graph
    nodes, cut, used_inputs, used_inits = _trace(model, start, outputs, dtypes)
    inits = {t.name: t for t in g.initializer}
    graph_inputs = [v.name for v in g.input if v.name in used_inputs]
    sub = sub_model(model, f"suffix_{start}", nodes,
                    [typed(n, dtypes[n]) for n in [start, *cut, *graph_inputs]], outputs,
                    [inits[n] for n in sorted(used_inits)])
    return Suffix(sub, start, cut, graph_inputs, list(outputs))


def typed(name: str, dtype: np.dtype) -> onnx.ValueInfoProto:
    """A sub-model input declared by element type alone: sub-models run on stacked candidates
    and chunks of any length, so no shape is declared."""
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                         None)


def sub_model(model: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto],
              inputs: list[onnx.ValueInfoProto], outputs: list[str],
              initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A model of some of ``model``'s nodes (with its opsets and IR version), returning
    ``outputs``: the one way suffixes, prefixes and the refit's segments are cut out."""
    graph = helper.make_graph(nodes, name, inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def build_prefix(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The sub-model that computes ``outputs`` from the graph inputs: only the nodes they depend
    on, and only the weights those read (a session on the whole model runs every node whatever
    is fetched)."""
    g = model.graph
    keep, used_inputs, used_inits, _ = _upstream(g, outputs)
    inits = {t.name: t for t in g.initializer}
    return sub_model(model, "prefix", [g.node[i] for i in keep],
                     [v for v in g.input if v.name in used_inputs], outputs,
                     [inits[n] for n in sorted(used_inits)])


def _upstream(g: onnx.GraphProto, outputs: list[str],
              cut: Callable[[str], bool] = lambda v: False, fed: Collection[str] = ()
              ) -> tuple[list[int], set[str], set[str], set[str]]:
    """The backward trace both sub-models are cut by: (the indices, in graph order, of the nodes
    ``outputs`` depend on, the graph inputs and the initializers they read, the computed values
    where ``cut`` stopped the trace). The trace stops at ``fed`` (values the caller declares
    itself, a graph input among them), initializers, graph inputs and cut values."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    inits = {t.name for t in g.initializer}
    inputs = {v.name for v in g.input} - inits
    keep: set[int] = set()
    used_inits: set[str] = set()
    used_inputs: set[str] = set()
    stopped: set[str] = set()
    stack, seen = list(outputs), set()
    while stack:
        v = stack.pop()
        if not v or v in seen:
            continue
        seen.add(v)
        if v in fed:
            continue
        if v in inits:
            used_inits.add(v)
        elif v in inputs:
            used_inputs.add(v)
        elif v not in producer:
            raise OptinError(f"internal: value '{v}' has no producer")
        elif cut(v):
            stopped.add(v)
        elif producer[v] not in keep:
            keep.add(producer[v])
            node = g.node[producer[v]]
            stack.extend([*node.input, *implicit_inputs(node)])
    return sorted(keep), used_inputs, used_inits, stopped


class BlockValues:
    """One block's dense values (its consumer's input and output) at a time, computed where a
    task runs, from a sub-model that stops at them.

    The consumer input of an FFN block is the widest activation of a transformer layer (4x the
    hidden size); caching it for every block at once held all tokens of all layers (a third of
    the scoring stage's memory on a DINOv2-S-size model at 224 px). Tasks come block by block,
    so each block's values are computed when its first task runs, with the next block's in the
    same run, and dropped after: the sub-models' runs cost at most one dense forward per pair of
    blocks, about half of one on average."""

    def __init__(self, model: onnx.ModelProto, cal: CalibrationSet,
                 providers: list[str] | None):
        self.model, self.cal, self.providers = model, cal, providers
        self._held: tuple[tuple[str, ...], list[dict[str, np.ndarray]]] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}

    def get(self, names: tuple[str, ...], threads: int | None,
            ahead: tuple[str, ...] = ()) -> list[dict[str, np.ndarray]]:
        """``names`` per calibration chunk (``threads``: onnxruntime's intra-op threads). When
        they must be computed, ``ahead`` (the next block's) are computed in the same run and
        kept with them: one sub-model and run for two blocks."""
        if self._held is None or not set(names) <= set(self._held[0]):
            self._held = None
            release_memory()
            both = tuple(dict.fromkeys([*names, *ahead]))
            self._held = (both, [values for _, values in prefix_runs(
                self.model, self.cal, list(both), self.providers, threads)])
        return self._held[1]


def prefix_runs(model: onnx.ModelProto, cal: CalibrationSet, names: list[str],
                providers: list[str] | None, threads: int | None = None
                ) -> Iterator[tuple[Chunk, dict[str, np.ndarray]]]:
    """Each calibration chunk with ``names`` computed for it by the prefix sub-model that stops
    at them (:func:`build_prefix`), one chunk at a time."""
    prefix = build_prefix(model, names)
    sess = session(prefix, providers, threads=threads, arena=False)
    wanted = [i.name for i in sess.get_inputs()]
    del prefix
    for chunk in cal.chunks:
        yield chunk, dict(zip(names, sess.run(names, {k: chunk.feeds[k] for k in wanted})))


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names ``node``'s subgraphs (If branches, Loop bodies) read from the enclosing graph."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for sub in graphs:
            local = {v.name for v in sub.input} | {t.name for t in sub.initializer}
            local |= {o for n in sub.node for o in n.output}
            for n in sub.node:
                out |= {i for i in (*n.input, *implicit_inputs(n)) if i and i not in local}
    return out


class SuffixSessions:
    """One block's suffix model and onnxruntime session at a time, built where a task runs.

    A scoring job is shipped to every worker process; shipping each block's suffix (a copy of
    every weight downstream of the block) would multiply the data moved by the number of blocks,
    and keeping all of them open would multiply the memory. So a worker rebuilds the suffix of the
    block its task belongs to from the one model it holds, and keeps it while tasks of that block
    follow (tasks are issued block by block)."""

    def __init__(self, model: onnx.ModelProto, dtypes: dict[str, np.dtype],
                 providers: list[str] | None):
        self.model = model
        self.dtypes = dtypes
        self.providers = providers
        self._open: tuple[tuple, Suffix, ort.InferenceSession] | None = None  # key, suffix, session

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}

    def open(self, start: str, outputs: list[str], threads: int | None
             ) -> tuple[Suffix, ort.InferenceSession]:
        """The suffix from ``start`` to ``outputs`` and a session on it (``threads`` intra-op)."""
        key = (start, tuple(outputs), threads)
        if self._open is None or self._open[0] != key:
            self._open = None  # the previous block's session goes before the next one is built
            release_memory()
            sfx = build_suffix(self.model, start, outputs, self.dtypes)
            sess = session(sfx.model, self.providers, outputs=sfx.outputs, threads=threads,
                           arena=False)
            sfx.model = None
            self._open = (key, sfx, sess)
        return self._open[1], self._open[2]
