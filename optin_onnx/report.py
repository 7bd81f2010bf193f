"""Measure and render the before/after comparison of a pruned model.

A prune is only worth shipping if the user can see, in one place, what it bought (MACs, parameters,
file size, latency) and what it cost (fidelity to the dense model, the numerical verification, and
the structures the pruner chose to leave alone). This module holds the parameter count, the
:class:`Report` record the pipeline fills in, and the rendering of that record as a table; latency
is timed by :mod:`optin_onnx.latency` and fidelity measured with :mod:`optin_onnx.metrics`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

# Re-exported: the benchmarks in tools/ import the latency functions from here.
from optin_onnx.guard import write_atomically
from optin_onnx.latency import LatencyStats, compare_latency, latency_entry, measure_latency

__all__ = [
    "LatencyStats",
    "Report",
    "peak_memory",
    "compare_latency",
    "count_parameters",
    "latency_entry",
    "measure_latency",
    "print_report",
    "render",
]

# Every floating-point element type, including the 8/6/4-bit float formats of newer opsets: a weight
# stored in any of them is still a learned parameter. Integer tensors are shapes, indices and axes.
_FLOAT_TYPES = frozenset(
    value
    for name, value in onnx.TensorProto.DataType.items()
    if name.startswith("FLOAT") or name in ("DOUBLE", "BFLOAT16")
)


# --------------------------------------------------------------------------------------------------
# Parameters


def count_parameters(model: onnx.ModelProto) -> int:
    """Count the float elements a model stores as weights.

    Initializers of any float type count in full; a ``Constant`` node counts when it holds more than
    one float element, since exporters sometimes inline weights as constants while scalar constants
    are epsilons and scales, not parameters. Integer tensors (shapes, axes, indices) never count.
    Sizes come from ``dims`` alone, so a model loaded without its external data is counted
    correctly. Subgraphs (``If``/``Loop``/``Scan`` bodies) are included.
    """
    return _count_graph(model.graph)


def _count_graph(graph: onnx.GraphProto) -> int:
    total = sum(math.prod(t.dims) for t in graph.initializer if t.data_type in _FLOAT_TYPES)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _count_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(_count_graph(g) for g in attr.graphs)
            elif node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                total += _constant_float_elements(attr)
    return total


def _constant_float_elements(attr: onnx.AttributeProto) -> int:
    """Float elements of one ``Constant`` attribute, or 0 when it is a scalar or not float."""
    if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
        n = math.prod(attr.t.dims)
    elif attr.name == "value_floats":
        n = len(attr.floats)
    else:
        return 0
    return n if n > 1 else 0


# --------------------------------------------------------------------------------------------------
# Memory


def peak_memory() -> dict[str, float]:
    """Peak resident memory in GiB so far: of this process, and of the largest child process that
    has ended (a local scoring pool's workers; Ray's workers are the Ray instance's children, not
    ours). Empty where the platform keeps no such record (Windows)."""
    try:
        import resource
    except ImportError:
        return {}
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    return {"process_gib": own / 2**30, "largest_child_gib": child / 2**30}


# --------------------------------------------------------------------------------------------------
# Report record


@dataclass
class Report:
    """Everything one prune produced, as written to the JSON report and shown by :func:`render`.

    ``flops_target`` and ``flops_achieved`` use the pruner's convention (the same for both), so they
    compare directly. ``layers`` has one entry per prunable block:
    ``{"block", "kind": "attention"|"mlp", "units_before", "units_after", "unit": "heads"|"neurons"}``.
    ``latency`` maps a case name such as ``"cpu b1 s128"`` to ``{"before_ms", "after_ms",
    "speedup"}`` (see :func:`latency_entry`). ``objective_outputs`` are the graph outputs the
    output term compared (``--objective-output``; by default every output a pruned block can
    change); ``fidelity_by_output`` maps each to its fidelity metrics, and ``fidelity`` is the
    first one's (the key reports had before there could be several); ``outputs_left_out`` maps
    every other graph output to why it was not compared. ``verify`` holds ``max_abs_err``,
    ``tolerance``, ``cases`` (the input shapes checked) and ``passed``. ``declined`` lists
    structures left unpruned, each with its reason. ``interface`` lists the graph inputs and
    outputs whose shape the prune changed (a decoder's KV cache: ``{"name", "kind":
    "input"|"output", "axis", "before", "after"}``). ``peak_memory`` is :func:`peak_memory` at
    the end of the run, ``stage_peak_gib`` this process's peak as each stage ended (the stage
    where it last rose is the one that set it); ``scoring`` says how scoring divided its work: executor, workers, samples
    per chunk, candidates per run, the memory limit, and how many tokens the Gram matrices sample
    of how many real ones.
    """

    input_path: str
    output_path: str
    flops_target: float
    flops_achieved: float
    seq_len: int  # 0: the model has no sequence input (images)
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    size_before: int
    size_after: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)
    fidelity_by_output: dict[str, dict[str, float]] = field(default_factory=dict)
    objective_outputs: list[str] = field(default_factory=list)
    outputs_left_out: dict[str, str] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_gib: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    interface: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types, equal to what :meth:`to_json` writes and ``json.load`` reads.

        Numpy scalars and arrays, tuples and paths that stages put in the report become Python
        numbers, lists and strings; non-finite floats become ``None`` so the file is strict JSON.
        """
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, path: str | Path) -> None:
        """Write the report atomically, so a crash never leaves a truncated report behind."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# Rendering


def render(report: Report) -> str:
    """The report as plain text: a before/after table, per-block units, fidelity, verification,
    stage times and declined structures. Used for logs and tests, where colour codes are noise."""
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(_renderable(report))
    return console.export_text()


def print_report(report: Report) -> None:
    """Print the report to stdout, in colour when stdout is a terminal."""
    Console().print(_renderable(report))


def _renderable(report: Report) -> Group:
    parts: list[Any] = [
        Text.assemble(("optin-onnx: ", "bold"), report.input_path, " -> ", report.output_path),
        Text(
            f"FLOPs target {report.flops_target:.1%}, achieved {report.flops_achieved:.1%}"
            + (f", at sequence length {report.seq_len}" if report.seq_len else
               " (inputs without a sequence axis)")
        ),
        _summary_table(report),
    ]
    if report.layers:
        parts.append(_layers_table(report.layers))
    if report.objective_outputs:
        parts.append(_objectives_text(report.objective_outputs, report.outputs_left_out))
    if report.fidelity_by_output or report.fidelity:
        parts.append(_fidelity_table(report.fidelity_by_output or {"": report.fidelity}))
    parts.append(_verify_text(report.verify))
    if report.stage_seconds:
        parts.append(_stages_table(report.stage_seconds, report.stage_peak_gib))
    if report.peak_memory or report.scoring:
        parts.append(_resources_table(report.peak_memory, report.scoring))
    parts += _bullets("Declined (left unpruned)", report.declined, "yellow")
    parts += _bullets("Notes", report.notes, "dim")
    return Group(*parts)


def _summary_table(report: Report) -> Table:
    table = Table(title="Before / after")
    table.add_column("Metric")
    table.add_column("Before", justify="right")
    table.add_column("After", justify="right")
    table.add_column("Change", justify="right")
    for name, before, after, fmt in (
        ("MACs", report.macs_before, report.macs_after, _count),
        ("Parameters", report.params_before, report.params_after, _count),
        ("File size", report.size_before, report.size_after, _bytes),
    ):
        table.add_row(name, fmt(before), fmt(after), _change(before, after))
    for case, entry in report.latency.items():
        speedup = entry["speedup"]
        table.add_row(
            Text(f"Latency {case}"),
            f"{entry['before_ms']:.2f} ms",
            f"{entry['after_ms']:.2f} ms",
            Text(f"{speedup:.2f}x", style="green" if speedup > 1 else "red"),
        )
    return table


def _layers_table(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="Units per block")
    table.add_column("Block")
    table.add_column("Kind")
    table.add_column("Before -> after", justify="right")
    table.add_column("Kept", justify="right")
    for layer in layers:
        before, after = layer["units_before"], layer["units_after"]
        table.add_row(
            Text(layer["block"]),
            Text(layer["kind"]),
            Text(f"{before} -> {after} {layer['unit']}", style="" if after < before else "dim"),
            f"{after / before:.0%}" if before else "n/a",
        )
    return table


def _objectives_text(objectives: list[str], left_out: dict[str, str]) -> Text:
    text = Text.assemble(("Scored against: ", "bold"), ", ".join(objectives))
    if left_out:
        text.append("; left out: " + ", ".join(f"{name} ({why})"
                                               for name, why in left_out.items()))
    return text


def _fidelity_table(by_output: dict[str, dict[str, float]]) -> Table:
    """One row per metric of each output (the output column only when there is one to name)."""
    table = Table(title="Fidelity")
    named = any(by_output)
    if named:
        table.add_column("Output")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for output, metrics in by_output.items():
        for name, value in metrics.items():
            table.add_row(*([Text(output)] if named else []), Text(name), f"{value:.6g}")
    return table


def _verify_text(verify: dict[str, Any]) -> Text:
    if not verify:
        return Text("Verify: not run", style="yellow")
    passed = verify["passed"]
    cases = ", ".join(_shape(c) for c in verify["cases"])
    return Text.assemble(
        "Verify: ",
        ("PASSED" if passed else "FAILED", "bold green" if passed else "bold red"),
        f"  max |err| {verify['max_abs_err']:.3g}"
        + (f", {verify['max_scaled_err']:.3g} scaled by max(1, |output|)"
           if "max_scaled_err" in verify else "")
        + f" (tolerance {verify['tolerance']:.3g}) over {len(verify['cases'])} case(s): {cases}",
    )


def _stages_table(stage_seconds: dict[str, float], peaks: dict[str, float]) -> Table:
    total = sum(stage_seconds.values())
    table = Table(title="Time per stage")
    table.add_column("Stage")
    table.add_column("Seconds", justify="right")
    table.add_column("Share", justify="right")
    if peaks:
        table.add_column("Peak memory so far", justify="right")
    for name, seconds in stage_seconds.items():
        row = [Text(name), f"{seconds:.2f}", f"{seconds / total:.0%}" if total else "n/a"]
        table.add_row(*row, *([f"{peaks[name]:.2f} GiB" if name in peaks else ""] if peaks else []))
    table.add_row(Text("total", style="bold"), f"{total:.2f}", "", *([""] if peaks else []))
    return table


_SCORING_LABELS = {"executor": "Scoring executor", "workers": "Scoring workers",
                   "memory_limit_gib": "Memory limit (GiB)",
                   "one_sample_forward_mib": "One sample's forward values (MiB)",
                   "gram_tokens": "Gram matrix tokens (K)",
                   "neuron_group": "Neuron group", "neuron_group_auto": "Neuron group chosen (auto)",
                   "estimated_dense_forwards": "Scoring estimate (dense forwards)"}


def _resources_table(memory: dict[str, float], scoring: dict[str, Any]) -> Table:
    table = Table(title="Resources")
    table.add_column("What")
    table.add_column("Value", justify="right")
    if "process_gib" in memory:
        table.add_row("Peak resident memory", f"{memory['process_gib']:.2f} GiB")
    if memory.get("largest_child_gib"):
        table.add_row("Peak of the largest worker process", f"{memory['largest_child_gib']:.2f} GiB")
    for key, value in scoring.items():
        label = _SCORING_LABELS.get(key, key.replace("_", " ").capitalize())
        table.add_row(Text(label), "none" if value is None else
                      f"{value:.3g}" if isinstance(value, float) else Text(str(value)))
    return table


def _bullets(title: str, items: list[str], style: str) -> list[Text]:
    if not items:
        return []
    return [Text(title, style="bold")] + [Text(f"  - {item}", style=style) for item in items]


def _count(n: int) -> str:
    """Counts in engineering units (``22.71 M``), as MACs and parameters are usually quoted."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}"
    return str(n)


def _bytes(n: int) -> str:
    for factor, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{n} B"


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def _shape(case: Any) -> str:
    if isinstance(case, (list, tuple)) and all(isinstance(d, int) for d in case):
        return "x".join(str(d) for d in case)
    return str(case)
