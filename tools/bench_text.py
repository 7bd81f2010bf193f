"""Benchmarks on all-MiniLM-L6-v2 (6 layers x 12 heads, FFN 1536) for docs/RESULTS.md (speed).

    python -m tools.bench_text scorers   # fast vs naive scorer, side by side, same elements
    python -m tools.bench_text exact     # exact scoring of all 72 heads + 9,216 neurons
    python -m tools.bench_text e2e       # default configuration, end to end, with latency
    python -m tools.bench_text latency   # dense vs that pruned model, several interleaved trials

Each writes a JSON record under ``--out`` (default ``docs/bench``) and prints a summary. The model
and calibration data are built from packaged weights and BBC News text (cached, see models.cache).
Long-running by design: these are not tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from tools.bench.timing import dense_forward_s


def _setup(n_texts: int, max_length: int, cache: str | None, attention: str | None):
    from models.build import build_calib, minilm_export
    from models.cache import cache_dir

    model = minilm_export(cache, attention=attention)
    calib = cache_dir(cache) / f"bbc_{n_texts}x{max_length}.npz"
    if not calib.exists():
        build_calib(calib, texts="bbc", n=n_texts, max_length=max_length)
    return model, calib


def _scoring_inputs(model_path: Path, calib_path: Path, samples: int):
    """Model, structure and scoring set of the first ``samples`` calibration samples."""
    from optin_onnx.options import PruneOptions
    from optin_onnx.stages.prepare import prepare

    prep = prepare(model_path, calib_path, PruneOptions(samples=samples))
    return prep.model, prep.structure, prep.cal


def bench_scorers(args) -> dict:
    """Both scorers on the same calibration set and the same randomly chosen elements."""
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast, score_naive

    model, calib = _setup(args.texts, args.max_length, args.cache, args.attention)
    m, s, cal = _scoring_inputs(model, calib, args.texts)
    rng = np.random.default_rng(args.seed)
    units = {b.name: sorted(rng.choice(b.n_units, max(1, round(b.n_units * args.fraction)),
                                       replace=False).tolist()) for b in s.blocks}
    n = sum(len(u) for u in units.values())
    cfg = ScoreConfig()
    t0 = time.perf_counter()
    fast = score_fast(m, s, cal, cfg, only=units)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = score_naive(m, s, cal, cfg, only=units)
    t_naive = time.perf_counter() - t0
    rel = {}
    for term in ("md", "kd", "importance"):
        a = np.concatenate([getattr(fast, term)[b][units[b]] for b in units])
        r = np.concatenate([getattr(naive, term)[b][units[b]] for b in units])
        rel[term] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    return {"elements": n, "texts": args.texts, "max_length": args.max_length,
            "tokens": int(cal.token_mask.sum()), "fast_s": t_fast, "naive_s": t_naive,
            "speedup": t_naive / t_fast, "max_rel_diff_vs_max": rel}


def bench_exact(args) -> dict:
    """Exact scores for every head and neuron, next to the floor: the layer-forwards a neuron of
    layer l needs (layers l+1..L-1) and a head needs (its own FFN onwards), priced at one dense
    layer-forward of the whole calibration set as onnxruntime runs it. The price is measured
    before and after the scoring and the lower one is used: noise only adds time, and the two
    have differed by a fifth on this machine (docs/RESULTS.md)."""
    import onnx_ir as ir

    from optin_onnx.latency import measure_latency
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast

    model, calib = _setup(args.texts, args.max_length, args.cache, args.attention)
    m, s, cal = _scoring_inputs(model, calib, args.texts)
    price = lambda: measure_latency(ir.to_proto(m), cal.feeds, repeats=20).median_ms / 1000
    before = price()
    t0 = time.perf_counter()
    score_fast(m, s, cal, ScoreConfig(neuron_group=1))
    seconds = time.perf_counter() - t0
    after = price()
    layers = s.n_layers
    per_layer = min(before, after) / layers
    forwards = sum(b.n_units * ((layers - 1 - b.layer) if b.kind == "mlp" else (layers - b.layer))
                   for b in s.blocks)
    floor = forwards * per_layer
    heads = sum(b.n_units for b in s.blocks if b.kind == "attention")
    neurons = sum(b.n_units for b in s.blocks if b.kind == "mlp")
    return {"heads": heads, "neurons": neurons, "texts": args.texts, "max_length": args.max_length,
            "tokens": int(cal.token_mask.sum()), "seconds": seconds,
            "dense_forward_s": min(before, after), "dense_forward_before_after_s": [before, after],
            "layer_forwards_floor": forwards, "floor_s": floor, "ratio": seconds / floor}


def _pruned_path(model: Path) -> Path:
    """Where ``e2e`` writes its pruned model and ``latency`` reads it: named after the dense
    export, so latency never times a pruned model against a dense export of another form."""
    return model.with_name(f"{model.stem}_pruned_bench.onnx")


def bench_e2e(args) -> dict:
    from optin_onnx.pipeline import PruneOptions, prune

    n = args.texts + 32
    model, calib = _setup(n, args.max_length, args.cache, args.attention)
    opt = PruneOptions(flops=args.flops, samples=args.texts, neuron_group=args.neuron_group,
                       width_multiple=args.ffn_multiple, reconstruct=args.reconstruct)
    arrays = np.load(calib)
    dense_s = dense_forward_s(model, {k: arrays[k][:args.texts] for k in arrays.files})
    t0 = time.perf_counter()
    result = prune(model, calib, opt, output=_pruned_path(model))
    seconds = time.perf_counter() - t0
    r = result.report
    return {"model": model.name, "flops_target": args.flops, "flops_achieved": r.flops_achieved,
            "dense_forward_s": dense_s, "dense_forwards": seconds / dense_s,
            "scoring": r.scoring, "peak_memory_gib": r.peak_memory, "stage_peak_gib": r.stage_peak_gib,
            "neuron_group": r.scoring.get("neuron_group"), "ffn_multiple": args.ffn_multiple,
            "texts": args.texts,
            "reconstruct": args.reconstruct, "seconds": seconds, "stage_seconds": r.stage_seconds, "notes": list(r.notes),
            "latency": r.latency,
            "fidelity": r.fidelity, "verify": r.verify,
            "layers": {x["block"]: x["units_after"] for x in r.layers}}


def bench_latency(args) -> dict:
    """Dense vs the model the e2e benchmark wrote, timed interleaved, several trials: batch-1
    latency on a shared 2-core machine moves by +-15 % from one trial to the next, so report the
    median speed-up and the spread instead of one draw."""
    from optin_onnx.io import load_calibration
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import sample_feeds, sequence_inputs
    from optin_onnx.report import compare_latency

    model, calib = _setup(args.texts + 32, args.max_length, args.cache, args.attention)
    pruned = _pruned_path(model)
    if not pruned.exists():
        raise SystemExit("run `python -m tools.bench_text e2e` first")
    m = as_model(model)
    arrays = load_calibration(calib, [v.name for v in m.graph.inputs])
    out: dict = {"model": model.name}
    for batch, seq in ((1, 128), (32, 128)):
        feeds = sample_feeds(arrays, batch, seq, sequence_inputs(m))
        trials = [compare_latency(model, pruned, feeds, max_seconds=args.seconds, repeats=10_000)
                  for _ in range(args.trials)]
        speedups = sorted(a.median_ms / b.median_ms for a, b in trials)
        out[f"b{batch} s{seq}"] = {
            "dense_ms": float(np.median([a.median_ms for a, _ in trials])),
            "pruned_ms": float(np.median([b.median_ms for _, b in trials])),
            "speedup_median": float(np.median(speedups)), "speedup_min": speedups[0],
            "speedup_max": speedups[-1], "trials": args.trials}
    return out


def main(argv: list[str] | None = None) -> int:
    from optin_onnx.reconstruct import CORRECTIONS

    p = argparse.ArgumentParser(prog="python -m tools.bench_text", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["scorers", "exact", "e2e", "latency"])
    p.add_argument("--trials", dest="trials", type=int, default=5,
                   help="latency: interleaved timing trials")
    # The earlier spelling, still accepted, not listed ("rounds" now means pruning rounds).
    p.add_argument("--rounds", dest="trials", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=20.0, help="latency: seconds per trial")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--fraction", type=float, default=1 / 24,
                   help="scorers: share of heads and of neurons compared (same for both)")
    p.add_argument("--flops", type=float, default=0.6)
    p.add_argument("--neuron-group", type=int, default=None, help="e2e: default of PruneOptions")
    p.add_argument("--ffn-multiple", dest="ffn_multiple", type=int, default=None,
                   help="e2e: keep FFN widths a multiple of N (default of PruneOptions)")
    # The earlier spelling, still accepted (recorded commands use it), not listed.
    p.add_argument("--round", dest="ffn_multiple", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--reconstruct", choices=CORRECTIONS, default=None,
                   help="e2e: correction of the kept weights (default of PruneOptions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None)
    p.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                   help="transformers' attention implementation of the MiniLM export "
                        "(default: the library's default; records before issue 9 used eager)")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    from optin_onnx.pipeline import PruneOptions

    d = PruneOptions()
    args.ffn_multiple = d.width_multiple if args.ffn_multiple is None else args.ffn_multiple
    # An explicit correction gets its own record (e2e_refit.json): the default's stays comparable.
    stem = args.what if args.reconstruct is None else f"{args.what}_{args.reconstruct}"
    args.reconstruct = d.reconstruct if args.reconstruct is None else args.reconstruct
    Path(args.out).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()  # the machine is shared: timings mean little without it
    record = {"scorers": bench_scorers, "exact": bench_exact, "e2e": bench_e2e,
              "latency": bench_latency}[args.what](args)
    record["command"] = "python -m tools.bench_text " + " ".join(argv or sys.argv[1:])
    record["load_average"] = {"before": load_before, "after": os.getloadavg()}
    path = Path(args.out) / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
