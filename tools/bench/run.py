"""A benchmark run: every method at every FLOPs level, on one prepared model.

Per level and method: the selection (:mod:`tools.bench.methods`; ``optin+obs`` re-chooses the
units within blocks, :data:`~tools.bench.methods.WITHIN`), the correction for ``optin+ls``,
``optin+refit`` and ``optin+obs`` (:data:`~tools.bench.methods.CORRECTION`), the rewrite, the
evaluation, and the FLOPs counted on the rewritten graph. onnxsim's rows (:mod:`tools.bench.onnxsim`) are swept
to the same levels.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx

from tools.bench.methods import CORRECTION, WITHIN, Importances, Settings, mean_row
from tools.bench.onnxsim import ONNXSIM, sweep

if TYPE_CHECKING:
    from optin_onnx.stages.prepare import Prepared

#: Row name of (method, lambda, whether it ran in rounds): each tool names its own rows.
Namer = Callable[[str, float, bool], str]
#: Called with (method, level, pruned model, its metrics) after each evaluation.
LevelHook = Callable[[str, float, onnx.ModelProto, dict], None]


def run(prep: Prepared, path, methods: list[str], settings: Settings,
        evaluate: Callable[[onnx.ModelProto], dict], name: Namer,
        on_level: LevelHook | None = None) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """({row name: one row per level}, {row name: scoring seconds}) for ``methods`` in order.

    A row holds ``evaluate``'s metrics (averaged over seeds), ``flops_kept`` (measured),
    ``seconds`` (selection, correction and rewrite, without the evaluation) and ``level``."""
    import onnx_ir as ir

    from optin_onnx.flops import total_macs
    from optin_onnx.reconstruct import correct
    from optin_onnx.reconstruct.choose import choose_within
    from optin_onnx.rewrite import rewrite

    scores = Importances(prep, settings)
    rows_of: dict[str, list[dict]] = {}
    seconds_of: dict[str, float] = {}
    for method in methods:
        if method in ONNXSIM:
            seconds, rows = sweep(method, path, prep, evaluate, settings)
            rows_of[name(method, 1.0, False)] = rows
            seconds_of[name(method, 1.0, False)] = seconds
            continue
        pickers = scores.pickers(method)
        print(f"{method}: scored in {max(t for t, _ in pickers.values()):.0f} s", flush=True)
        for lam, (seconds, runs) in pickers.items():
            rows = []
            for level in settings.levels:
                per_seed = []
                for pick in runs:
                    t1 = time.perf_counter()
                    sel = pick(level)
                    if method in WITHIN:
                        sel = dataclasses.replace(sel, keep=choose_within(
                            prep.model, prep.structure, sel.keep, prep.cal).keep)
                    base = (correct(CORRECTION[method], prep.model, prep.structure, sel.keep,
                                    prep.cal, prep.held if prep.has_held else None).model
                            if method in CORRECTION else prep.model)
                    slim = rewrite(base, prep.structure, sel.keep)
                    spent = time.perf_counter() - t1
                    proto = ir.to_proto(slim)
                    got = evaluate(proto)
                    got["flops_kept"] = total_macs(slim, prep.seq_len,
                                                   like=prep.calib) / prep.macs.total
                    got["seconds"] = spent
                    if on_level:
                        on_level(method, level, proto, got)
                    per_seed.append(got)
                rows.append(mean_row(per_seed, level))
                print(f"{method} lam {lam:g} @ {level}: {rows[-1]}", flush=True)
            row_name = name(method, lam, scores.rounds(method))
            rows_of[row_name] = rows
            seconds_of[row_name] = seconds
    return rows_of, seconds_of
