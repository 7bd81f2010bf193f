"""onnx-simplifier's own structured pruning as benchmark rows, at the same measured FLOPs.

onnxsim prunes only onnxruntime's fused graph and has no FLOPs budget: for each level its sparsity
is swept until the fused graph's MACs are closest to the level (:mod:`tools.competitors`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tools.bench.methods import Settings

if TYPE_CHECKING:
    from optin_onnx.stages.prepare import Prepared

#: Row method -> onnxsim variant (:data:`tools.competitors.VARIANTS`).
ONNXSIM = {"onnxsim-magnitude": "magnitude", "onnxsim-wanda": "wanda", "onnxsim-heads": "heads"}


def sweep(method: str, path, prep: Prepared, evaluate: Callable[[object], dict],
          settings: Settings) -> tuple[float, list[dict]]:
    """(fusion seconds, one row per level); a level onnxsim cannot reach (or a graph it cannot
    prune) is a row with a ``note`` instead of metrics."""
    from tools import competitors as C

    variant = ONNXSIM[method]
    t0 = time.perf_counter()
    base = C.ort_fuse(str(path))
    fused_s = time.perf_counter() - t0
    ops = sorted({n.op_type for n in base.graph.node if n.domain == "com.microsoft"})
    feeds = C.feeds_for(base, prep.calib, settings.samples) if variant == "wanda" else None

    def ratio(model) -> float:
        return C.fused_macs(model, prep.seq_len, like=prep.calib) / prep.macs.total

    rows = []
    for level in settings.levels:
        t1 = time.perf_counter()
        got = C.prune_to_flops(base, level, variant, ratio, feeds)
        spent = time.perf_counter() - t1
        row = {"level": level, "flops_kept": got["flops_kept"], "seconds": spent,
               "head_sparsity": got["head_sparsity"], "neuron_sparsity": got["neuron_sparsity"],
               "fused_ops": ops}
        if C.param_count(got["model"]) == C.param_count(base):
            row["note"] = f"cannot prune (fused: {', '.join(ops)}): nothing matched"
        elif abs(got["flops_kept"] - level) > settings.reach:
            row["note"] = f"cannot reach (closest {got['flops_kept']:.2f})"
        else:
            row.update(evaluate(got["model"]))
        rows.append(row)
        print(f"{method} @ {level}: {row}", flush=True)
    return fused_s, rows
