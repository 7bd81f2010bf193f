"""The whole job as one function: load -> analyse -> calibrate -> score -> search -> rewrite ->
simplify -> verify -> report. Each stage is a plain function of its own module; this file only
wires them together, times them and fills the report."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import Structure, analyze_graph
from optin_onnx.passes.unfuse_projections import split_fused_projections
from optin_onnx.calibrate import CalibrationSet, capture, make_calibration, subset
from optin_onnx.passes.canonicalize_reshapes import canonicalize_reshapes
from optin_onnx.errors import OptinError, first_line
from optin_onnx.flops import MacModel, mac_model, total_macs
from optin_onnx.graph import copy_model, normalize
from optin_onnx.iterate import budgets, rounds
from optin_onnx.guard import refuse_unsafe_writes
from optin_onnx.io import CALIBRATION_LIMIT_BYTES, files_read, load_model, save_model
from optin_onnx.options import PruneOptions, providers_for
# Re-exported: the name callers (the CLI, tools) know it by.
from optin_onnx.io import calibration_for as as_calibration
from optin_onnx.latency import compare_latency, latency_entry
from optin_onnx.metrics import cosine_similarity, kl_divergence, top1_agreement
from optin_onnx.probe import dummy_feeds, probe, sample_feeds, sequence_inputs
from optin_onnx.report import Report, count_parameters
from optin_onnx.reconstruct import reconstruct
from optin_onnx.rewrite import rewrite
from optin_onnx.scoring.features import objective_output, output_kind
from optin_onnx.scoring.importance import IMPORTANCES, make_importance
from optin_onnx.scoring.types import ScoreConfig, Scores
from optin_onnx.search import SearchResult, search
from optin_onnx.simplify import choose as choose_simplified
from optin_onnx.verify import RUN_ERRORS, VerifyResult, verify

#: Importance criteria (optin_onnx.scoring.importance); all share the search, rewrite and verify
#: stages (the accuracy benchmark): optin (trajectory scores), local (the ablation: the unit's own
#: layer only), magnitude (squared L2 norm of the unit's weights), random (seeded by ``seed``).
METHODS = tuple(IMPORTANCES)

@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    structure: Structure
    scores: Scores
    selection: SearchResult
    verification: VerifyResult
    stage_seconds: dict[str, float] = field(default_factory=dict)


def as_model(model: str | os.PathLike | ir.Model | onnx.ModelProto) -> ir.Model:
    """A private, name-normalised copy (the caller's file or object is never modified)."""
    if isinstance(model, onnx.ModelProto):
        return normalize(ir.from_proto(model))
    if isinstance(model, ir.Model):
        return normalize(copy_model(model))
    return normalize(load_model(model))


def analyze(model: str | os.PathLike | ir.Model | onnx.ModelProto,
            calib: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
            max_calib_bytes: int = CALIBRATION_LIMIT_BYTES) -> tuple[ir.Model, Structure]:
    """Stage *analyse* on its own: the prunable blocks and what was declined. ``calib`` (as for
    :func:`prune`) only sets the probe's input shapes."""
    m = as_model(model)
    split_fused_projections(m)
    feeds = None if calib is None else dummy_feeds(m, like=as_calibration(m, calib,
                                                                          max_calib_bytes))
    return m, analyze_graph(m, probe(m, feeds))


def _file_size(path: Path) -> int:
    """Bytes of a model file plus the external-data files its initializers point to."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data
                 if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).exists())


@contextmanager
def _timed(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def _fidelity(dense: onnx.ModelProto, slim: onnx.ModelProto, name: str, kind: str,
              cal: CalibrationSet, providers: list[str]) -> dict[str, float]:
    want = [c[name] for c in capture(dense, cal, [name], providers)]
    got = [c[name] for c in capture(slim, cal, [name], providers)]
    if kind in ("logits", "embedding"):
        t, s = np.concatenate(want), np.concatenate(got)
        if kind == "logits":
            return {"kl_to_dense": kl_divergence(t, s), "top1_agreement": top1_agreement(t, s)}
        return {"cosine_to_dense": cosine_similarity(t, s)}
    # Token outputs: real tokens only, chunk by chunk (each chunk is cut to its own longest text).
    rows_t, rows_s = [], []
    for a, b, chunk in zip(want, got, cal.chunks):
        ra, rb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        mask = chunk.feeds.get("attention_mask")
        if mask is not None and mask.size == ra.shape[0]:
            real = mask.reshape(-1).astype(bool)
            ra, rb = ra[real], rb[real]
        rows_t.append(ra)
        rows_s.append(rb)
    return {"token_cosine_to_dense": cosine_similarity(np.concatenate(rows_t),
                                                       np.concatenate(rows_s))}


def prune(model: str | os.PathLike | ir.Model | onnx.ModelProto,
          calib: str | os.PathLike | dict[str, np.ndarray],
          options: PruneOptions | None = None, *, output: str | os.PathLike | None = None,
          report_path: str | os.PathLike | None = None,
          progress: Callable[[int, int], None] | None = None, **overrides) -> PruneResult:
    """Prune ``model`` to ``flops`` of its MACs using OPTIN trajectory scores.

    ``calib``: an .npz path or a dict of arrays, one per graph input, first axis = sample.
    Options come from ``options`` and/or keyword overrides (``flops=0.6, prune="heads"``, ...).
    With ``output`` the pruned model is written there, and with ``report_path`` the report as
    JSON (both atomically; both checked before any work: never over an input or each other).
    ``progress(done, total)`` is called while scoring.
    """
    for k in overrides:
        if not hasattr(PruneOptions, k):
            raise TypeError(f"unknown option {k!r}")
    # A copy: the caller's options object is left as given.
    # A new object, checked again (PruneOptions.__post_init__).
    opt = dataclasses.replace(options or PruneOptions(), **overrides)
    schedule = budgets(opt.flops, opt.steps)
    providers = providers_for(opt.provider)
    stages: dict[str, float] = {}
    input_path = None if isinstance(model, (ir.Model, onnx.ModelProto)) else Path(model)

    notes: list[str] = []
    with _timed(stages, "load"):
        m = as_model(model)
        # Before any work: no output may replace an input or another output, and each can be
        # written (save_model checks again, as the last line of defence).
        calib_path = calib if isinstance(calib, (str, os.PathLike)) else None
        refuse_unsafe_writes([("output path", output), ("--report path", report_path)],
                             [*files_read(m), ("calibration file", calib_path)])
        original = ir.to_proto(m)  # the baseline the report compares against
        arrays = as_calibration(m, calib, opt.max_calib_bytes)
    with _timed(stages, "analyse"):
        n_unfused = split_fused_projections(m)
        if n_unfused:
            notes.append(f"{n_unfused} fused projections (MatMul -> Split) split back into one "
                         f"MatMul per output")
        structure = analyze_graph(m, probe(m, dummy_feeds(m, like=arrays)))
        if not structure.blocks:
            why = "; ".join(f"{d.name}: {d.reasons[0]}" for d in structure.declined[:3])
            raise OptinError("no prunable structure found" + (f" ({why})" if why else
                             " (no MatMul/Gemm chain ends in a weight contraction)"))
    with _timed(stages, "calibrate"):
        full = make_calibration(arrays, opt.chunk_size)
        n = full.n
        n_score = min(max(1, opt.samples), n)
        held = np.arange(n_score, min(n, n_score + 64))
        cal = subset(full, np.arange(n_score), opt.chunk_size)
        held_cal = subset(full, held, opt.chunk_size) if held.size else cal
        # Text: FLOPs at the mean real length. No sequence input (images): shapes are fixed,
        # the length is moot and reported as 0.
        has_seq = bool(sequence_inputs(m))
        seq_len = opt.seq_len or (max(1, int(round(cal.mean_length))) if has_seq else 0)
        macs = mac_model(m, structure, seq_len, like=arrays)
    cfg = ScoreConfig(lam=opt.lam, tokens=opt.tokens, seed=opt.seed,
                      candidates_per_run=opt.candidates_per_run,
                      neuron_group=opt.neuron_group, feature_kind=opt.feature_kind,
                      teacher=opt.round_teacher, providers=providers)
    criterion = make_importance(opt.method, cfg)

    def score(base) -> Scores:
        """This round's importances (``base``: the previous round's selection, None at first)."""
        with _timed(stages, "score"):
            total = sum(b.n_units if base is None else len(base[b.name])
                        for b in structure.blocks)
            done = [0]

            def tick(k: int) -> None:
                done[0] += k
                if progress:
                    progress(done[0], total)

            return criterion.score(m, structure, cal, base=base, progress=tick)

    def select(importance, flops: float, alive) -> SearchResult:
        with _timed(stages, "search"):
            return search(structure, importance, macs, flops, prune=opt.prune,
                          width_multiple=opt.width_multiple,
                          channel_multiple=opt.channel_multiple,
                          allow_block_removal=opt.allow_block_removal, alive=alive)

    for step in rounds(score, select, schedule):
        scores, selection = step.scores, step.selection
    if opt.steps > 1:
        notes.append(f"{opt.steps} rounds of scoring and search, at "
                     + ", ".join(f"{b:.3g}" for b in schedule) + " of the FLOPs")
    if opt.method != "optin":
        notes.append(f"importance criterion: {opt.method}")
    if opt.reconstruct:
        with _timed(stages, "reconstruct"):
            fixed = reconstruct(m, structure, selection.keep, cal, providers=providers)
            m = fixed.model
            applied = [c.block for c in fixed.corrections if c.applied]
            notes.append(f"least-squares correction applied to {len(applied)} of "
                         f"{len(fixed.corrections)} pruned blocks"
                         + "".join(f"; {c.block} kept as is ({c.reason})"
                                   for c in fixed.corrections if not c.applied))
    with _timed(stages, "rewrite"):
        slim_ir = rewrite(m, structure, selection.keep)
    if opt.canonicalize:
        with _timed(stages, "canonicalize"):
            probes = [probe(slim_ir, dummy_feeds(slim_ir, batch=b, seq=s, like=arrays))
                      for b, s in ((3, 11), (2, 7))]
            n_fixed = canonicalize_reshapes(slim_ir, probes)
            if n_fixed:
                notes.append(f"{n_fixed} run-time Reshape targets replaced by constants "
                             f"(their shape-computing nodes removed)")
    slim = ir.to_proto(slim_ir)
    with _timed(stages, "simplify"):
        batch, seq = (list(opt.latency_cases) or [(1, seq_len or None)])[-1]
        slim, why = choose_simplified(slim, sample_feeds(arrays, batch, seq, sequence_inputs(m)),
                                      opt.simplify, providers)
        if why:
            notes.append(why)
    with _timed(stages, "verify"):
        onnx.checker.check_model(slim, full_check=True)
        result = verify(m, slim, structure, selection.keep, full, opt.tolerance, providers)
        if not result.passed:
            raise OptinError(result.failure())
        notes.extend(f"verify case {case} skipped" for case in result.skipped)
    with _timed(stages, "report"):
        dense_proto = original
        slim_model = ir.from_proto(slim)
        macs_after = total_macs(slim_model, seq_len, like=arrays)
        objective = next(v for v in m.graph.outputs if v.name == objective_output(m, structure))
        if objective.name != m.graph.outputs[0].name:
            notes.append(f"scored and measured on output '{objective.name}': the outputs before "
                         f"it do not depend on any pruned block")
        kind = output_kind(m, objective.name, len(objective.shape or ()) or 2, "auto")
        fidelity = _fidelity(dense_proto, slim, objective.name, kind, held_cal, providers)
        if not held.size:
            notes.append("no held-out calibration samples: fidelity measured on the scoring set")
        latency = {}
        for batch, seq in opt.latency_cases:
            feeds = sample_feeds(arrays, batch, seq, sequence_inputs(m))
            try:
                before, after = compare_latency(dense_proto, slim, feeds, providers=providers,
                                                max_seconds=opt.latency_seconds)
            except RUN_ERRORS as exc:  # a shape the model cannot take: the prune stands
                notes.append(f"latency case b{batch} s{seq} skipped: onnxruntime cannot run the "
                             f"model at that shape ({first_line(exc)})")
                continue
            latency[f"{opt.provider} b{batch} s{seq}"] = latency_entry(before, after)
    if output is not None:
        save_model(slim, output, input_path=input_path)
    report = Report(
        input_path=str(input_path) if input_path else "<in-memory>",
        output_path=str(output) if output else "<in-memory>",
        flops_target=opt.flops, flops_achieved=macs_after / macs.total, seq_len=seq_len,
        macs_before=macs.total, macs_after=macs_after,
        params_before=count_parameters(dense_proto), params_after=count_parameters(slim),
        size_before=_file_size(input_path) if input_path else dense_proto.ByteSize(),
        size_after=_file_size(Path(output)) if output else slim.ByteSize(),
        layers=[{"block": b.name, "kind": b.kind, "unit": b.unit_name,
                 "units_before": b.n_units, "units_after": len(selection.keep[b.name])}
                for b in structure.blocks],
        latency=latency, fidelity=fidelity, verify=result.to_dict(), stage_seconds=stages,
        declined=[f"{d.name}: {'; '.join(d.reasons)}" for d in structure.declined], notes=notes)
    if report_path is not None:
        report.to_json(report_path)
    return PruneResult(slim, report, structure, scores, selection, result, stages)


__all__ = ["METHODS", "PruneOptions", "PruneResult", "prune", "analyze", "MacModel"]
