"""Stage *prepare*: load -> analyse -> calibrate and count, once per run, into one record.

Everything later stages read and never change: the model (a private copy), its structure, the
calibration arrays split into scoring and held-out sets, and the MAC model. ``prune`` and every
benchmark start here, so they score, search and measure the same thing.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import Structure, analyze_graph
from optin_onnx.calibrate import CalibrationSet, Chunking, chunking, make_calibration, subset
from optin_onnx.errors import OptinError
from optin_onnx.flops import MacModel, mac_model
from optin_onnx.graph import copy_model, normalize
from optin_onnx.guard import Labelled, refuse_unsafe_writes
from optin_onnx.io import calibration_for, files_read, load_model
from optin_onnx.options import PruneOptions, providers_for
from optin_onnx.passes.unfuse_projections import split_fused_projections
from optin_onnx.probe import probe_like, sequence_inputs
from optin_onnx.scoring.budget import GroupChoice, choose_group
from optin_onnx.scoring.features import objective_outputs, outputs_left_out
from optin_onnx.stages.clock import Clock

#: A model as the API takes it: a path, or an object that is copied, never changed.
ModelLike = str | os.PathLike | ir.Model | onnx.ModelProto
#: Calibration as the API takes it: an ``.npz`` path or arrays by graph input name.
CalibLike = str | os.PathLike | Mapping[str, np.ndarray]

#: Samples after the scoring set kept for the fidelity figures (more only cost report time).
HELD_OUT = 64


@dataclass(frozen=True)
class Prepared:
    """What a run knows before scoring.

    ``model``: the private copy every later stage reads (fused projections split back);
    ``original``: the input as loaded, the baseline of the report (a graph copy sharing the
    weights with ``model``, serialised only when the report runs it); ``source``: its file (None
    for an object). ``calib``: every checked calibration array; ``full``, ``cal`` and ``held``: all
    samples (verify), the first ``samples`` (scoring) and up to :data:`HELD_OUT` after them
    (fidelity; the scoring set when none are left, ``has_held`` False). ``seq_len``: the length
    MACs are counted at (0: a model without a sequence axis). ``providers``: onnxruntime's, for
    every later run. ``objectives``: the graph outputs scoring compares and fidelity is measured
    on (``--objective-output``, resolved); ``outputs_left_out``: every other output, with why."""

    model: ir.Model
    original: ir.Model
    source: Path | None
    structure: Structure
    calib: dict[str, np.ndarray]
    full: CalibrationSet
    cal: CalibrationSet
    held: CalibrationSet
    has_held: bool
    seq_len: int
    macs: MacModel
    providers: list[str]
    notes: tuple[str, ...]
    chunking: Chunking  # samples per chunk and candidates per run, under --max-memory-gib
    group: GroupChoice  # --neuron-group, resolved (auto: from the estimated scoring cost)
    objectives: tuple[str, ...]
    outputs_left_out: dict[str, str]


def as_model(model: ModelLike) -> ir.Model:
    """A private, name-normalised copy (the caller's file or object is never modified)."""
    if isinstance(model, onnx.ModelProto):
        return normalize(ir.from_proto(model))
    if isinstance(model, ir.Model):
        return normalize(copy_model(model))
    return normalize(load_model(model))


def prepare(model: ModelLike, calib: CalibLike, options: PruneOptions, *,
            writes: Sequence[Labelled] = (), clock: Clock | None = None) -> Prepared:
    """Load ``model`` and ``calib``, analyse the model and count its MACs.

    ``writes``: the files the caller will write, refused before the calibration is read if one
    would replace an input or another (``save_model`` checks again, as the last line of
    defence). Uses ``options.samples``, ``seq_len``, ``chunk_size``, ``max_calib_bytes`` and
    ``objective_outputs``. Raises :class:`OptinError` for a model with nothing to prune, or
    nothing (or an unknown output) to score against."""
    clock = clock or Clock()
    providers = providers_for(options.provider)  # a missing CUDA provider is found first
    notes = []
    with clock("load"):
        m = as_model(model)
        calib_path = calib if isinstance(calib, (str, os.PathLike)) else None
        refuse_unsafe_writes(list(writes), [*files_read(m), ("calibration file", calib_path)])
        original = m.clone()
        arrays = calibration_for(m, calib, options.max_calib_bytes)
    with clock("analyse"):
        n_unfused = split_fused_projections(m)
        if n_unfused:
            notes.append(f"{n_unfused} fused projections (Split or Slices of one product) split back into one "
                         f"MatMul per output")
        structure = analyze_graph(m, probe_like(m, arrays))
        if not structure.blocks:
            why = "; ".join(f"{d.name}: {d.reasons[0]}" for d in structure.declined[:3])
            raise OptinError("no prunable structure found" + (f" ({why})" if why else
                             " (no MatMul/Gemm chain ends in a weight contraction)"))
        # A KV cache's present outputs are state, not results: their shape follows the kept
        # heads, and the result they feed is an objective already.
        cache = {p.name for b in structure.blocks for p in b.ports if p.output}
        objectives = tuple(objective_outputs(m, structure, options.objective_outputs, cache))
        left_out = outputs_left_out(m, structure, objectives, cache)
    with clock("calibrate"):
        plan = chunking(ir.to_proto(m), arrays, options.chunk_size, options.candidates_per_run,
                        None if options.max_memory_gib is None else
                        int(options.max_memory_gib * 2**30))
        full = make_calibration(arrays, plan.chunk_size)
        n_score = min(max(1, options.samples), full.n)
        held = np.arange(n_score, min(full.n, n_score + HELD_OUT))
        cal = subset(full, np.arange(n_score), plan.chunk_size)
        held_cal = subset(full, held, plan.chunk_size) if held.size else cal
        # Text: FLOPs at the mean real length. No sequence input (images): shapes are fixed,
        # the length is moot and reported as 0.
        has_seq = bool(sequence_inputs(m))
        seq_len = options.seq_len or (max(1, int(round(cal.mean_length))) if has_seq else 0)
        macs = mac_model(m, structure, seq_len, like=arrays)
        group = choose_group(m, structure, macs, options.neuron_group)
    source = None if isinstance(model, (ir.Model, onnx.ModelProto)) else Path(model)
    return Prepared(m, original, source, structure, arrays, full, cal, held_cal,
                    bool(held.size), seq_len, macs, providers, tuple(notes), plan, group,
                    objectives, left_out)
