"""The refit's forward passes: the dense teacher and the pruned student walked through the graph
together, one segment at a time, so that refitting every block costs about one forward pass of
each instead of one per fit.

onnxruntime runs every node of a session whatever outputs are fetched, so reading one layer's
activations from a whole-model session costs a whole forward pass, and a refit that does so per
consumer costs a pass per consumer (24 on a 12-layer encoder, over both sample sets). The fits
come in graph order and a fit changes only its own consumer's weights, so the values *before*
the next consumer stay valid. A :class:`Walk` therefore holds, for every walker (the teacher, the
student with the fits so far, the student without them) and every chunk, only the values that
cross its current position in the (topologically sorted) node list, and runs the nodes between
two positions as a session of their own:

    position p --[segment p..q: a session of those nodes]--> position q
      live values at p (residual stream, masks,               live values at q
      the next consumer's input ...) fed in                   fetched out

``goto(q)`` moves every walker to ``q`` (a commit); ``values(...)`` returns values at or after
the position without moving (a peek: a fit reads its consumer's input and the point after it,
then changes the consumer's weights, so the walk must not move past the consumer before the
fit). Positions only move forward; a segment's session is dropped once the walk is past it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from optin_onnx import runtime
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.scoring.suffix import implicit_inputs, sub_model, typed


class Walk:
    """Walkers over ``proto`` (a model whose masks and fitted weights are graph inputs). Each
    walker has its own extra feeds (masks, weights) on top of the calibration inputs and runs on
    its own sets (``runs``: walker -> sets; the whole model's check needs the uncorrected
    student on the held-out samples only)."""

    def __init__(self, proto: onnx.ModelProto, feeds: Mapping[str, Mapping[str, np.ndarray]],
                 runs: Mapping[str, Sequence[CalibrationSet]],
                 providers: Sequence[str] | None) -> None:
        g = proto.graph
        self.nodes = list(g.node)
        self.end = len(self.nodes)
        self.inits = {t.name: t for t in g.initializer}
        self.proto = proto
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.reads = [[i for i in (*n.input, *implicit_inputs(n)) if i] for n in self.nodes]
        #: the last node reading each value; a graph output is read at the end
        self.last_read: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                self.last_read[name] = i
        for o in g.output:
            self.last_read[o.name] = self.end
        self.feeds = {walker: dict(f) for walker, f in feeds.items()}
        self.providers = providers
        self.position = 0
        #: (walker, set): the set and one dict of live values per chunk
        self.state: dict[tuple[str, int], tuple[CalibrationSet, list[dict[str, np.ndarray]]]] = {
            (walker, id(data)): (data, [{} for _ in data.chunks])
            for walker, sets in runs.items() for data in sets}
        self._sessions: dict[tuple[int, int, tuple[str, ...]],
                             tuple[ort.InferenceSession, list[str]]] = {}

    def set(self, walker: str, name: str, arr: np.ndarray) -> None:
        """A new value for one of ``walker``'s extra feeds (a fitted weight), used from now on."""
        self.feeds[walker][name] = arr

    def drop(self, data: CalibrationSet) -> None:
        """Stop walking ``data`` (its fits are done): later moves do not run it."""
        self.state = {k: v for k, v in self.state.items() if k[1] != id(data)}

    def goto(self, position: int) -> None:
        """Move every walker to node ``position`` (at or after the current one): each runs the
        nodes in between on every chunk and keeps only the values still read from there on."""
        if position < self.position:
            raise ValueError(f"internal: the walk is at node {self.position}, not before "
                             f"{position}")
        if position > self.position:
            keep = tuple(sorted(name for name, last in self.last_read.items()
                                if last >= position and self.producer.get(name, self.end)
                                < position))
            for (walker, _), (data, chunks) in self.state.items():
                for live, chunk in zip(chunks, data.chunks):
                    got = self._run(position, keep, live, {**chunk.feeds, **self.feeds[walker]})
                    live.clear()
                    live.update(got)
            self.position = position
            self._sessions = {k: v for k, v in self._sessions.items() if k[0] >= position}
            runtime.release_memory()

    def values(self, walker: str, data: CalibrationSet, names: Sequence[str]
               ) -> Iterator[dict[str, np.ndarray]]:
        """{name: value} of ``names`` for ``walker`` on ``data``, chunk by chunk, without moving:
        each is live at the position, a calibration input or feed, or made by a later node (the
        nodes up to the last of those run from the live values, each time this is called)."""
        later = tuple(n for n in names if self.producer.get(n, -1) >= self.position)
        stop = max((self.producer[n] for n in later), default=self.position - 1) + 1
        for live, chunk in zip(self.state[(walker, id(data))][1], data.chunks):
            feeds = {**chunk.feeds, **self.feeds[walker]}
            got = self._run(stop, later, live, feeds) if later else {}
            yield {n: got[n] if n in got else live[n] if n in live else feeds[n] for n in names}

    def _run(self, stop: int, outputs: tuple[str, ...], live: Mapping[str, np.ndarray],
             feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the nodes from the position to ``stop`` on one chunk and return ``outputs`` (one
        made before the position is passed through from ``live``)."""
        made = tuple(o for o in outputs if self.producer[o] >= self.position)
        out = {o: live[o] for o in outputs if self.producer[o] < self.position}
        if made:
            sess, inputs = self._session(stop, made, live, feeds)
            out.update(zip(made, sess.run(list(made), {n: live[n] if n in live else feeds[n]
                                                        for n in inputs})))
        return out

    def _session(self, stop: int, outputs: tuple[str, ...], live: Mapping[str, np.ndarray],
                 feeds: Mapping[str, np.ndarray]) -> tuple[ort.InferenceSession, list[str]]:
        """The session of the nodes from the position to ``stop`` returning ``outputs``, and the
        names it reads; built once, its input types taken from the first chunk's arrays."""
        key = (self.position, stop, outputs)
        if key not in self._sessions:
            nodes = self.nodes[self.position:stop]
            made = {o for n in nodes for o in n.output if o}
            read = list(dict.fromkeys(i for k in range(self.position, stop)
                                      for i in self.reads[k] if i not in made))
            inputs = [i for i in read if i not in self.inits]
            model = sub_model(self.proto, f"segment_{self.position}_{stop}", nodes,
                              [typed(i, (live[i] if i in live else feeds[i]).dtype)
                               for i in inputs], list(outputs),
                              [self.inits[i] for i in read if i in self.inits])
            self._sessions[key] = (runtime.session(model, self.providers, arena=False), inputs)
        return self._sessions[key]
