"""Latency of OPTIN-pruned models against the FLOPs they keep, before and after onnxruntime's
transformer fusion (the fine-tuned sentiment classifier of tools.bench_accuracy).

    python -m tools.bench_fusion [--levels 0.9,0.8,0.7,0.6,0.5] [--rounds 5] [--seconds 10]

For every level, the model is pruned as ``optin-onnx prune`` builds it (OPTIN scores computed once,
32 calibration texts, neuron groups of 8; search, rewrite, constant Reshape targets) without
onnxsim, whose Gemm rewrite hides the patterns onnxruntime fuses. Each is then passed through
``onnxruntime.transformers.optimizer.optimize_model`` (model_type ``bert``); the record counts the
fused nodes per type and checks the fused graph computes what the unfused one does.

Head counts: the export writes ``-1`` for the head count in its Q/K/V Reshapes, so onnxruntime
cannot read it from the graph and falls back to the one ``num_heads`` it is given; a pruned model
has a different count in every layer. :func:`explicit_head_counts` writes each layer's count into
its Reshape target (``[0, 0, -1, d]`` -> ``[0, 0, n, d]``, the same reshape), after which
``num_heads=0`` lets the fusion read it per layer.

Latency: each round times, per case (batch x sequence), the pairs (dense, pruned) and (dense fused,
pruned fused) for every level and (dense, dense fused), each pair interleaved
(``optin_onnx.report.compare_latency``); the record keeps per-pair medians over rounds and their
spread. It is only meaningful on an otherwise idle machine. A run with fewer than 3 rounds or
under 5 s per pair is a smoke run: its record is ``fusion_smoke.json`` and its latency stays out of
docs/RESULTS.md (the fusion counts go in either way: they do not depend on timing).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

#: Fused node types reported (onnxruntime contrib ops, plus LayerNormalization for the remainder).
FUSED = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu",
         "Gelu", "EmbedLayerNormalization", "LayerNormalization")


def explicit_head_counts(model: onnx.ModelProto) -> int:
    """Replace ``-1`` in constant Reshape targets ``[a, b, -1, d]`` by ``width / d`` where the
    reshaped tensor's last dimension ``width`` is static (shape inference); each edited Reshape
    gets its own target initializer. Returns how many were rewritten. ``model`` is edited in
    place; the graph computes the same values."""
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    width = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            width[vi.name] = dims[-1].dim_value
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for n in model.graph.node:
        if n.op_type != "Reshape" or n.input[1] not in inits or n.input[0] not in width:
            continue
        target = numpy_helper.to_array(inits[n.input[1]])
        if target.shape != (4,) or target[2] != -1 or target[3] <= 0 \
                or width[n.input[0]] % target[3]:
            continue
        target = target.copy()
        target[2] = width[n.input[0]] // target[3]
        name = f"{n.name or n.output[0]}__explicit_heads"
        model.graph.initializer.append(numpy_helper.from_array(target, name))
        n.input[1] = name
        changed += 1
    return changed


def fuse(model: onnx.ModelProto, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """onnxruntime's BERT fusion (optimizer level 0: its Python fusions only, no session
    optimisation baked in). ``num_heads=0`` reads the head count of every layer from the graph."""
    from onnxruntime.transformers import optimizer

    # With num_heads=0 the fusion warns on every pruned layer that the attention width (heads x
    # head size) differs from the projections' input width: true after pruning, and harmless.
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="optin-fuse-") as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=num_heads,
                                           hidden_size=hidden_size, opt_level=0, use_gpu=False)
    return opt.model


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per type in :data:`FUSED`, and all nodes (``nodes``)."""
    c = Counter(n.op_type for n in model.graph.node)
    return {**{k: c.get(k, 0) for k in FUSED}, "nodes": len(model.graph.node)}


def _heads(model: onnx.ModelProto) -> list[int]:
    return [next(a.i for a in n.attribute if a.name == "num_heads")
            for n in model.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]


def _pruned(levels: list[float]):
    """Dense export, calibration arrays and {level: (pruned proto, flops kept at the searched
    length, kept units)}, pruned like ``optin-onnx prune --simplify off`` from one scoring."""
    import onnx_ir as ir

    from optin_onnx.passes.canonicalize_reshapes import canonicalize_reshapes
    from optin_onnx.flops import total_macs
    from optin_onnx.probe import dummy_feeds, probe
    from optin_onnx.rewrite import rewrite
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
    from optin_onnx.search import search
    from tools.bench.methods import Settings
    from tools.bench.prepare import prepare
    from tools.bench.targets import text_target

    d = Settings()
    # Eager: onnxruntime's transformer optimizer fuses only that form into Attention; transformers'
    # default (SDPA) export stays unfused (tests/test_zoo.py), which would leave nothing to measure.
    target = text_target("sentiment", d.samples, attention="eager")
    su = prepare(target.path, target.calib)
    m, structure, calib, seq_len, macs = su.model, su.structure, su.calib, su.seq_len, su.macs
    t0 = time.perf_counter()
    scores = score_fast(m, structure, su.cal, ScoreConfig(neuron_group=d.neuron_group))
    print(f"scored in {time.perf_counter() - t0:.0f} s", flush=True)
    out = {}
    for level in levels:
        sel = search(structure, scores.importance, macs, level)
        slim = rewrite(m, structure, sel.keep)
        canonicalize_reshapes(slim, [probe(slim, dummy_feeds(slim, batch=b, seq=s, like=calib))
                                     for b, s in ((3, 11), (2, 7))])
        out[level] = (ir.to_proto(slim), total_macs(slim, seq_len, like=calib) / macs.total,
                      sel.counts())
    heads = next(b for b in structure.blocks if b.kind == "attention")
    return m, calib, seq_len, out, (heads.n_units, heads.n_units * heads.unit_size)


def bench(args) -> dict:
    import onnx_ir as ir

    from optin_onnx.flops import total_macs
    from optin_onnx.probe import sample_feeds, sequence_inputs
    from optin_onnx.report import compare_latency
    from optin_onnx.runtime import session

    m, calib, seq_len, pruned, (n_heads, hidden) = _pruned(args.levels)
    dense = ir.to_proto(m)
    check = sample_feeds(calib, 8, None, set())
    ref = session(dense).run(None, check)[0]
    models = {"dense": (dense, fuse(dense, n_heads, hidden))}
    for level, (proto, _, _) in pruned.items():
        explicit = onnx.ModelProto()
        explicit.CopyFrom(proto)
        explicit_head_counts(explicit)
        models[level] = (proto, fuse(explicit, 0, 0))
    record = {"model": "sentiment classifier (tools.bench_accuracy sentiment)",
              "seq_len_for_search": seq_len, "levels": {}, "latency": {}}
    for key, (plain, fused) in models.items():
        out = session(plain).run(None, check)[0]
        fused_out = session(fused).run(None, check)[0]
        entry = {"fused_nodes": fused_counts(fused), "unfused_nodes": len(plain.graph.node),
                 "attention_heads": _heads(fused),
                 "fused_max_abs_diff": float(np.abs(fused_out - out).max()),
                 "max_abs_diff_to_dense": float(np.abs(out - ref).max())}
        if key != "dense":
            entry["flops_kept"] = pruned[key][1]
            entry["kept"] = pruned[key][2]
        record["levels"][str(key)] = entry
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]
    for batch, seq in cases:
        feeds = sample_feeds(calib, batch, seq, sequence_inputs(m))
        dense_macs = total_macs(m, seq, like=calib)
        pairs = {"fusion gain (dense)": (models["dense"][0], models["dense"][1])}
        for level in args.levels:
            pairs[f"{level:g}"] = (models["dense"][0], models[level][0])
            pairs[f"{level:g} fused"] = (models["dense"][1], models[level][1])
        speedups: dict[str, list[float]] = {k: [] for k in pairs}
        ms: dict[str, list[tuple[float, float]]] = {k: [] for k in pairs}
        for r in range(args.rounds):
            for name, (a, b) in pairs.items():
                x, y = compare_latency(a, b, feeds, max_seconds=args.seconds, repeats=10_000)
                speedups[name].append(x.median_ms / y.median_ms)
                ms[name].append((x.median_ms, y.median_ms))
            print(f"b{batch} s{seq} round {r + 1}/{args.rounds} done", flush=True)
        case = {}
        for name in pairs:
            s = sorted(speedups[name])
            entry = {"before_ms": float(np.median([a for a, _ in ms[name]])),
                     "after_ms": float(np.median([b for _, b in ms[name]])),
                     "speedup_median": float(np.median(s)), "speedup_min": s[0],
                     "speedup_max": s[-1]}
            level = name.split()[0]
            if level in {f"{lv:g}" for lv in args.levels}:
                ratio = total_macs(ir.from_proto(models[float(level)][0]), seq, like=calib) \
                    / dense_macs
                entry["flops_kept_at_case"] = ratio
                entry["ideal_speedup"] = 1 / ratio
            case[name] = entry
        record["latency"][f"b{batch} s{seq}"] = case
    return record


def fusion_table(record: dict) -> str:
    """Markdown: fused nodes per type for the dense model and every pruned level."""
    cols = [k for k in FUSED if any(e["fused_nodes"][k] for e in record["levels"].values())]
    lines = ["| model | FLOPs kept | heads per layer | " + " | ".join(cols)
             + " | nodes (unfused -> fused) | max abs diff, fused vs unfused |",
             "|---" * (len(cols) + 5) + "|"]
    for key, e in record["levels"].items():
        flops = "1" if key == "dense" else f"{e['flops_kept']:.3f}"
        heads = ", ".join(str(h) for h in e["attention_heads"]) or "none fused"
        lines.append(f"| {key} | {flops} | {heads} | "
                     + " | ".join(str(e["fused_nodes"][k]) for k in cols)
                     + f" | {e['unfused_nodes']} -> {e['fused_nodes']['nodes']} | "
                     + f"{e['fused_max_abs_diff']:.0e} |")
    return "\n".join(lines)


def latency_table(record: dict) -> str:
    """Markdown: per case and level, median speed-up (unfused and fused) next to the ideal."""
    lines = ["| case | level | FLOPs kept at the case | ideal | speed-up | speed-up, both fused |",
             "|---|---|---|---|---|---|"]
    for case, rows in record["latency"].items():
        gain = rows["fusion gain (dense)"]
        lines.append(f"| {case} | dense fused vs dense | | | {gain['speedup_median']:.2f}x "
                     f"({gain['before_ms']:.1f} -> {gain['after_ms']:.1f} ms) | |")
        for name, e in rows.items():
            if "ideal_speedup" not in e or name.endswith("fused"):
                continue
            f = rows[f"{name} fused"]
            lines.append(f"| {case} | {name} | {e['flops_kept_at_case']:.3f} | "
                         f"{e['ideal_speedup']:.2f}x | {e['speedup_median']:.2f}x "
                         f"({e['speedup_min']:.2f}-{e['speedup_max']:.2f}) | "
                         f"{f['speedup_median']:.2f}x ({f['speedup_min']:.2f}-"
                         f"{f['speedup_max']:.2f}) |")
    return "\n".join(lines)


def update_results(record: dict, results: Path) -> None:
    """Replace the ``fusion:sentiment`` block of docs/RESULTS.md (latency only from full runs)."""
    from tools.bench.results import replace_block

    body = (f"Command: `{record['command']}`. Fused nodes per type after "
            f"`optimize_model(model_type='bert')` (pruned: head counts written into the Reshapes, "
            f"`num_heads=0`); the last column compares the fused and the unfused graph's logits "
            f"on 8 calibration texts.\n\n{fusion_table(record)}")
    if not record["smoke"]:
        body += (f"\n\nLatency (median of {record['rounds']} interleaved rounds):\n\n"
                 f"{latency_table(record)}")
    replace_block(results, "fusion:sentiment", body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_fusion",
                                description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--cases", default="1x128,32x128", help="batch x sequence, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0, help="per interleaved pair and round")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    record = bench(args)
    record["command"] = "python -m tools.bench_fusion " + " ".join(argv or sys.argv[1:])
    record["rounds"], record["seconds"] = args.rounds, args.seconds
    record["smoke"] = args.rounds < 3 or args.seconds < 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fusion_smoke.json" if record["smoke"] else "fusion.json"
    (out / name).write_text(json.dumps(record, indent=2) + "\n")
    update_results(record, out.parent / "RESULTS.md")
    print(fusion_table(record))
    if not record["smoke"]:
        print(latency_table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
