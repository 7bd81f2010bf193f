"""Scaling of the scoring stage over executors and workers, for docs/RESULTS.md.

    python -m tools.bench_scale                       # 4 x 384 encoder, local + 1 and 2 workers
    python -m tools.bench_scale --layers 12 --heads 12 --ffn 3072   # BERT-base size (slow)

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


def _encoder(args) -> Path:
    """The exported encoder, cached under ``--cache`` by its shape."""
    from models import text_encoders as te

    name = f"bert_{args.layers}x{args.heads * 64}_ffn{args.ffn}.onnx"
    path = Path(args.cache) / name
    if not path.exists():
        module = te.EncoderWrapper(te.tiny_bert(layers=args.layers, heads=args.heads, head_dim=64,
                                                ffn=args.ffn, vocab=1000, init_range=0.02),
                                   head="pool")
        te.export(module, path, exporter="torchscript")
    return path


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


def _dense_forward_s(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Median of 3 runs of the whole calibration set through the dense model."""
    from optin_onnx.runtime import session

    sess = session(str(path))
    sess.run(None, feeds)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6, help="heads of 64 channels each")
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--neuron-group", type=int, default=8)
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
    feeds = _calibration(args.texts, args.max_length)
    model, structure = analyze(path)
    cal = make_calibration(feeds, 16)
    base = ScoreConfig(neuron_group=args.neuron_group)
    dense_s = _dense_forward_s(path, feeds)
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
