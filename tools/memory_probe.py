"""Peak memory of the scoring stage's candidate runs under one setting, for docs/RESULTS.md.

    python -m tools.memory_probe --image 224 --chunk 16 --per-run 4 --arena   # the former default
    python -m tools.memory_probe --image 224 --chunk 8 --per-run 4            # the default now

Scores the first FFN block's first 8 neurons one by one (the block with the longest suffix, so
its runs are the largest a prune makes) on the DINOv2-S-size backbone that ``tools.bench_scale
--image`` exports (run that once first), with the calibration chunks, candidates per run and
onnxruntime arena asked for, and prints the seconds and the process's peak resident memory. One
setting per process, so each peak is its own. Not a test: it takes about a minute.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from tools.bench_scale import _inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--chunk", type=int, default=8, help="samples per calibration chunk")
    p.add_argument("--per-run", type=int, default=4, help="candidates stacked per run")
    p.add_argument("--arena", action="store_true", help="onnxruntime's CPU arena on (the former "
                   "default of the scorers' sessions)")
    p.add_argument("--cache", default="/tmp/optin-bench-scale")
    args = p.parse_args(argv)

    from optin_onnx import calibrate, runtime
    from optin_onnx.options import PruneOptions
    from optin_onnx.scoring import suffix
    from optin_onnx.scoring.fast import score_rank_k
    from optin_onnx.scoring.types import ScoreConfig
    from optin_onnx.stages.prepare import prepare

    calibrate.DEFAULT_RUN_BYTES = 2 ** 60  # the sizes asked for, not the default's cut
    if args.arena:
        plain = runtime.session

        def with_arena(*a, **k):
            return plain(*a, **{**k, "arena": True})

        runtime.session = suffix.session = with_arena
    path = Path(args.cache) / (f"dinov2_{args.layers}x{args.heads * 64}_ffn{args.ffn}_"
                               f"{args.image}px.onnx")
    if not path.exists():
        raise SystemExit(f"{path} not found: run `python -m tools.bench_scale --image "
                         f"{args.image} --prune` first")
    prep = prepare(path, _inputs(args, 64), PruneOptions(samples=32, chunk_size=args.chunk,
                                                         candidates_per_run=args.per_run))
    first = next(b for b in prep.structure.blocks if b.kind == "mlp")
    only = {b.name: list(range(8)) if b is first else [] for b in prep.structure.blocks}
    t0 = time.perf_counter()
    score_rank_k(prep.model, prep.structure, prep.cal,
                 ScoreConfig(neuron_group=1, candidates_per_run=args.per_run), only=only)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"chunks of {args.chunk}, {args.per_run} candidates per run, arena "
          f"{'on' if args.arena else 'off'}: {time.perf_counter() - t0:.1f} s, peak {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
