"""Scaling of the scoring stage over executors and workers, for docs/RESULTS.md.

    python -m tools.bench_scale                       # 4 x 384 encoder, local + 1 and 2 workers
    python -m tools.bench_scale --layers 12 --heads 12 --ffn 3072   # BERT-base size (slow)
    python -m tools.bench_scale --layers 12 --heads 12 --ffn 3072 --prune  # the default prune
    python -m tools.bench_scale --layers 12 --heads 6 --ffn 1536 --image 224 --prune  # DINOv2-S

With ``--prune`` it times the whole default ``prune`` instead (``--texts`` scoring texts plus as
many held out, as the refit checks its fits on them), per stage, with the peak resident memory,
the neuron group ``auto`` chose and its estimated cost: the issue's BERT-base-size target.

A random-weight BERT-style encoder (timing does not depend on the weights) is exported once and
scored with the default settings (neuron groups of 8, 4 candidates per run) by every executor and
worker count asked for; each run's scores are compared with the local run's. Next to each time it
records the machine's load average before and after (the benchmark machine may be shared) and one
dense forward pass of the calibration set, the machine-independent unit the issue's targets use.
Writes a JSON record under ``--out`` and prints a summary. Long-running by design: not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tools.bench.timing import dense_forward_s


def _encoder(args) -> Path:
    """The exported encoder, cached under ``--cache`` by its shape."""
    from models import text_encoders as te

    if args.image:
        return _dinov2(args)
    name = f"bert_{args.layers}x{args.heads * 64}_ffn{args.ffn}.onnx"
    path = Path(args.cache) / name
    if not path.exists():
        module = te.EncoderWrapper(te.tiny_bert(layers=args.layers, heads=args.heads, head_dim=64,
                                                ffn=args.ffn, vocab=1000, init_range=0.02),
                                   head="pool")
        te.export(module, path, exporter="torchscript")
    return path


def _dinov2(args) -> Path:
    """A random Dinov2 backbone of the asked shape at ``--image`` pixels, patches of 14."""
    from models import vision

    name = f"dinov2_{args.layers}x{args.heads * 64}_ffn{args.ffn}_{args.image}px.onnx"
    path = Path(args.cache) / name
    if not path.exists():
        module = vision.VisionWrapper(vision.tiny_vision(
            "dinov2", image=args.image, patch=14, heads=args.heads, head_dim=64, mlp=args.ffn,
            layers=args.layers, init_range=0.02))
        vision.export(module, path)
    return path


def _inputs(args, n: int) -> dict[str, np.ndarray]:
    """``n`` calibration samples: token ids, or images for ``--image``."""
    if args.image:
        from models import vision

        return {"pixel_values": vision.calibration_images(n, args.image)}
    return _calibration(n, args.max_length)


def _calibration(texts: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids, each text padded from a random length between half and all of
    ``length`` (the first at full length)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=texts)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, 1000, size=(texts, length)) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((texts, length), np.int64)}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _bench_prune(args, path: Path) -> int:
    """The default prune of the encoder at ``path``, timed per stage, into
    ``scale_prune_<model>.json``."""
    from optin_onnx.pipeline import PruneOptions, prune

    feeds = _inputs(args, 2 * args.texts)
    dense_s = dense_forward_s(path, {k: a[:args.texts] for k, a in feeds.items()})
    before = _load()
    t0 = time.perf_counter()
    result = prune(path, feeds, PruneOptions(samples=args.texts),
                   output=path.with_suffix(".pruned.onnx"))
    seconds = time.perf_counter() - t0
    r = result.report
    record = {"model": path.name, "params_mb": path.stat().st_size / 2**20, "texts": args.texts,
              "held_out": args.texts, "max_length": args.max_length,
              "cores": len(os.sched_getaffinity(0)), "dense_forward_s": dense_s,
              "seconds": seconds, "dense_forwards": seconds / dense_s,
              "stage_seconds": r.stage_seconds, "peak_memory_gib": r.peak_memory,
              "stage_peak_gib": r.stage_peak_gib,
              "scoring": r.scoring, "verified": r.verify.get("passed"),
              "flops_achieved": r.flops_achieved, "notes": list(r.notes),
              "load_before": before, "load_after": _load(),
              "command": "python -m tools.bench_scale " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale_prune_{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{seconds:.1f} s ({seconds / dense_s:.0f} dense forwards of {dense_s:.3f} s), peak "
          f"{r.peak_memory.get('process_gib', 0):.2f} GiB, stages "
          + ", ".join(f"{k} {v:.1f}" for k, v in r.stage_seconds.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6, help="heads of 64 channels each")
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--neuron-group", type=int, default=8, help="scoring runs (--prune: auto)")
    p.add_argument("--prune", action="store_true", help="time the default prune end to end")
    p.add_argument("--image", type=int, default=0,
                   help="--prune: a Dinov2 backbone at this many pixels instead of a text encoder")
    p.add_argument("--runs", default="local:1,processes:1,processes:2,ray:1,ray:2",
                   help="EXECUTOR:WORKERS,... (the first is the reference the others must equal)")
    p.add_argument("--cache", default="/tmp/optin-bench-scale")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)

    from optin_onnx.calibrate import make_calibration
    from optin_onnx.pipeline import analyze
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
    from optin_onnx.scoring.types import ExecutorConfig

    path = _encoder(args)
    if args.prune:
        return _bench_prune(args, path)
    feeds = _calibration(args.texts, args.max_length)
    model, structure = analyze(path)
    cal = make_calibration(feeds, 16)
    base = ScoreConfig(neuron_group=args.neuron_group)
    dense_s = dense_forward_s(path, feeds)
    record = {"model": path.name, "params_mb": path.stat().st_size / 2**20,
              "blocks": len(structure.blocks), "units": sum(b.n_units for b in structure.blocks),
              "texts": args.texts, "max_length": args.max_length,
              "real_tokens": int(cal.token_mask.sum()), "neuron_group": args.neuron_group,
              "cores": len(os.sched_getaffinity(0)), "dense_forward_s": dense_s, "runs": []}
    reference = None
    out = Path(args.out)
    for spec in args.runs.split(","):
        kind, workers = spec.split(":")
        cfg = replace(base, executor=ExecutorConfig(kind, int(workers)))
        before = _load()
        t0 = time.perf_counter()
        scores = score_fast(model, structure, cal, cfg)
        seconds = time.perf_counter() - t0
        top = max(np.abs(v).max() for v in scores.importance.values())
        diff = 0.0 if reference is None else max(
            float(np.abs(scores.importance[k] - reference.importance[k]).max()) / top
            for k in reference.importance)
        reference = reference or scores
        run = {"executor": kind, "workers": int(workers), "score_s": seconds,
               "dense_forwards": seconds / dense_s, "load_before": before, "load_after": _load(),
               "max_diff_vs_first_rel": diff,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "largest_child_rss_gib":
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
        record["runs"].append(run)
        print(f"{kind:>9} x{workers}: {seconds:7.1f} s ({seconds / dense_s:6.0f} dense forwards), "
              f"load {before} -> {run['load_after']}, max |diff| / max {diff:.1e}", flush=True)
        # After every run: on a shared machine a long benchmark may be stopped part-way.
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
