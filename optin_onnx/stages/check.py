"""Stage *check*: verify (the slim model computes what the masked reference computes, or nothing
is written), then what the report states: MACs, fidelity on the held-out samples (per objective
output: the outputs scoring compared), latency.
:func:`make_report` assembles the report once the model is written (it states the file's size).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optin_onnx.analysis import PortChange, pruned_feeds
from optin_onnx.calibrate import CalibrationSet, capture
from optin_onnx.errors import OptinError, first_line
from optin_onnx.flops import total_macs
from optin_onnx.latency import compare_latency, latency_entry
from optin_onnx.metrics import cosine_similarity, kl_divergence, top1_agreement
from optin_onnx.options import PruneOptions
from optin_onnx.probe import sample_feeds, sequence_inputs
from optin_onnx.report import Report, count_parameters, peak_memory
from optin_onnx.runtime import tensor_bytes
from optin_onnx.scoring.executors import stated_workers
from optin_onnx.scoring.features import output_kind
from optin_onnx.scoring.types import ExecutorConfig, Units
from optin_onnx.stages.build import Built
from optin_onnx.stages.clock import Clock
from optin_onnx.stages.prepare import Prepared
from optin_onnx.verify import RUN_ERRORS, VerifyResult, verify


@dataclass(frozen=True)
class Checked:
    """What the report states about a verified slim model; ``fidelity``: per objective output,
    in the prepare stage's order; ``notes``: checks skipped, and why; ``resized``: the graph
    inputs and outputs whose shape the prune changed (a KV cache); ``params_before`` and
    ``size_before``: of the input model (its files' bytes, or its tensors' for an object)."""

    verification: VerifyResult
    macs_after: int
    fidelity: dict[str, dict[str, float]]
    latency: dict[str, dict]
    notes: tuple[str, ...]
    params_before: int
    size_before: int
    resized: tuple[PortChange, ...] = ()


def fidelity(dense: onnx.ModelProto, slim: onnx.ModelProto, kinds: Mapping[str, str],
             cal: CalibrationSet, providers: list[str],
             changes: Mapping[str, PortChange] | None = None) -> dict[str, dict[str, float]]:
    """How close each slim output named in ``kinds`` (output -> its kind) stays to the dense
    one's on ``cal``, one run of each model for all of them. ``changes``: the slim model's
    resized inputs (a KV cache), fed their kept part."""
    names = list(kinds)
    want = capture(dense, cal, names, providers)
    slim_cal = cal.mapped(lambda feeds: pruned_feeds(feeds, changes)) if changes else cal
    got = capture(slim, slim_cal, names, providers)
    return {name: output_fidelity([c[name] for c in want], [c[name] for c in got], kinds[name],
                                  cal)
            for name in names}


def output_fidelity(want: list[np.ndarray], got: list[np.ndarray], kind: str,
                    cal: CalibrationSet) -> dict[str, float]:
    """One output's fidelity from its dense and slim values per chunk of ``cal``: KL and top-1
    agreement for logits, cosine for an embedding, cosine over real tokens for token outputs."""
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


def check(prep: Prepared, options: PruneOptions, built: Built, keep: Units, *,
          clock: Clock | None = None) -> Checked:
    """Raise :class:`OptinError` unless the slim model passes verify within
    ``options.tolerance``; then measure it. Shapes the model cannot run are noted, not fatal."""
    clock = clock or Clock()
    notes = []
    reference, slim = built.reference, built.slim
    with clock("verify"):
        onnx.checker.check_model(slim, full_check=True)
        result = verify(reference, slim, prep.structure, keep, prep.full, options.tolerance,
                        prep.providers)
        if not result.passed:
            raise OptinError(result.failure())
        notes.extend(f"verify case {case} skipped" for case in result.skipped)
    with clock("report"):
        changes = prep.structure.interface(keep)
        macs_after = total_macs(ir.from_proto(slim), prep.seq_len,
                                like=pruned_feeds(prep.calib, changes))
        resized = tuple(c for c in changes.values() if len(c.kept) != c.before)
        if resized:
            notes.append("the model's interface changed (a KV cache keeps the kept heads only: "
                         "allocate it at the new size): "
                         + "; ".join(c.describe() for c in resized))
        declared = {v.name: v for v in reference.graph.outputs}
        kinds = {name: output_kind(reference, name, len(declared[name].shape or ()) or 2, "auto")
                 for name in prep.objectives}
        original = ir.to_proto(prep.original)
        measured = fidelity(original, slim, kinds, prep.held, prep.providers, changes)
        if not prep.has_held:
            notes.append("no held-out calibration samples: fidelity measured on the scoring set")
        latency = {}
        for batch, seq in options.latency_cases:
            feeds = sample_feeds(prep.calib, batch, seq, sequence_inputs(reference))
            try:
                before, after = compare_latency(
                    original, slim, feeds, providers=prep.providers,
                    max_seconds=options.latency_seconds, pruned_feeds=pruned_feeds(feeds, changes))
            except RUN_ERRORS as exc:  # a shape the model cannot take: the prune stands
                notes.append(f"latency case b{batch} s{seq} skipped: onnxruntime cannot run the "
                             f"model at that shape ({first_line(exc)})")
                continue
            latency[f"{options.provider} b{batch} s{seq}"] = latency_entry(before, after)
    size_before = file_size(prep.source) if prep.source else tensor_bytes(original)
    return Checked(result, macs_after, measured, latency, tuple(notes),
                   count_parameters(original), size_before, resized)


def file_size(path: Path) -> int:
    """Bytes of a model file plus the external-data files its initializers point to."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data
                 if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).exists())


def scoring_summary(options: PruneOptions, prep: Prepared) -> dict[str, object]:
    """How scoring divided its work, for the report: where it ran, the chunking and the limit it
    was chosen under, the neuron group and the cost it was estimated at, and the share of tokens
    the Gram matrices sample."""
    plan, real = prep.chunking, int(prep.cal.token_mask.sum())
    workers = stated_workers(ExecutorConfig(options.executor, options.workers,
                                            options.ray_address))
    return {"executor": options.executor, "workers": workers,
            "samples_per_chunk": plan.chunk_size, "candidates_per_run": plan.candidates_per_run,
            "memory_limit_gib": options.max_memory_gib,
            "one_sample_forward_mib": plan.sample_bytes / 2**20,
            "neuron_group": prep.group.group, "neuron_group_auto": prep.group.auto,
            "estimated_dense_forwards": round(prep.group.cost, 1),
            "gram_tokens": (f"{min(options.tokens, real)} of {real} real tokens" if prep.seq_len
                            else f"{options.tokens} per feature map, at most its positions")}


def make_report(prep: Prepared, options: PruneOptions, built: Built, keep: Units,
                checked: Checked, notes: list[str], stage_seconds: dict[str, float],
                output: str | Path | None, stage_peaks: dict[str, float] | None = None
                ) -> Report:
    """The report of a run whose slim model is at ``output`` (None: kept in memory);
    ``stage_peaks``: the process's peak memory as each stage ended (:class:`Clock`)."""
    source = prep.source
    return Report(
        input_path=str(source) if source else "<in-memory>",
        output_path=str(output) if output else "<in-memory>",
        flops_target=options.flops, flops_achieved=checked.macs_after / prep.macs.total,
        seq_len=prep.seq_len, macs_before=prep.macs.total, macs_after=checked.macs_after,
        params_before=checked.params_before, params_after=count_parameters(built.slim),
        size_before=checked.size_before,
        size_after=file_size(Path(output)) if output else tensor_bytes(built.slim),
        layers=[{"block": b.name, "kind": b.kind, "unit": b.unit_name,
                 "units_before": b.n_units, "units_after": len(keep[b.name])}
                for b in prep.structure.blocks],
        latency=checked.latency, fidelity=checked.fidelity[prep.objectives[0]],
        fidelity_by_output=checked.fidelity, objective_outputs=list(prep.objectives),
        outputs_left_out=prep.outputs_left_out, verify=checked.verification.to_dict(),
        stage_seconds=stage_seconds, stage_peak_gib=dict(stage_peaks or {}),
        peak_memory=peak_memory(),
        scoring=scoring_summary(options, prep),
        declined=[f"{d.name}: {'; '.join(d.reasons)}" for d in prep.structure.declined],
        interface=[{"name": c.name, "kind": "output" if c.output else "input", "axis": c.axis,
                    "before": c.before, "after": len(c.kept)}
                   for c in checked.resized],
        notes=notes)
