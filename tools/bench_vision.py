"""CNN pruning quality against FLOPs kept, on packaged weights and packaged images.

    python -m tools.bench_vision digits [--net mnist|usps|svhn] [--levels ...] [--methods ...]
    python -m tools.bench_vision efficientnet [--levels ...] [--latency-seconds 10]

``digits``: a ccexam digit CNN on scikit-learn's ``load_digits`` (64 calibration images, the
other 1,733 held out): test accuracy, agreement with the dense model's predictions, KL to the
dense logits. ``efficientnet``: EfficientNet-Lite0 (ImageNet) on the natural photos shipped with
scikit-image / scikit-learn / matplotlib and their crops and flips; no labels exist offline, so
top-1 agreement, top-5 agreement (the dense top-1 class among the pruned model's top 5) and KL,
calibrating on the views of some photos and evaluating on the views of the others.

Every method shares the analysis, the MAC model, the channel search (multiples of 8) and the
rewrite; only the importance differs: ``optin`` (trajectory over the block outputs), ``local``
(the ablation: the first block output after the group only), ``magnitude`` (weights sliced away
with the channel), ``random`` (mean of 3 seeds); ``optin+ls`` is OPTIN's mask followed by the
least-squares correction (``--reconstruct``: groups read by one 1x1 conv or Gemm). Scores are computed once per method; each FLOPs
level is then a search + rewrite, and the FLOPs reported are counted on the rewritten graph.
With ``--latency-seconds`` the OPTIN model of each level is timed against the dense one in
onnxruntime (batch 1 and 32, interleaved; only meaningful on an otherwise idle machine).
Writes ``docs/bench/vision_<target>.json`` and ``.png`` and its block of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("optin", "optin+ls", "local", "magnitude", "random")


@dataclass
class Target:
    path: Path
    description: str
    calib: np.ndarray
    evaluate: np.ndarray
    labels: np.ndarray | None  # None: agreement with the dense model only


def target(name: str, net: str, samples: int | None) -> Target:
    if name == "digits":
        from models.cnn import digits_cnn, digits_data

        data = digits_data(net)
        calib = data["calib"][0][:samples] if samples else data["calib"][0]
        return Target(digits_cnn(net), f"ccexam {net} digit CNN on sklearn load_digits", calib,
                      data["test"][0], data["test"][1])
    from models.cnn import efficientnet_input, efficientnet_lite0_onnx, natural_images, natural_splits

    images, sources = natural_images()
    split = natural_splits(sources)
    x = efficientnet_input(images)
    # A seeded draw over every calibration photo's views (they are stored photo by photo: the
    # first 32 would all be views of one photo).
    calib = np.random.default_rng(0).permutation(split["calib"])[:samples or 32]
    return Target(efficientnet_lite0_onnx(), "EfficientNet-Lite0 (ImageNet) on packaged natural "
                  "images", x[np.sort(calib)], x[split["eval"]], None)


def outputs(proto, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from optin_onnx.runtime import session

    sess = session(proto)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def metrics(logits: np.ndarray, dense: np.ndarray, labels: np.ndarray | None) -> dict:
    from optin_onnx.scoring.losses import kl_divergence

    top1 = dense.argmax(1)
    out = {"agreement": float((logits.argmax(1) == top1).mean()),
           "top5_agreement": float(np.mean([t in row for t, row in
                                            zip(top1, np.argsort(-logits, 1)[:, :5])])),
           "kl_to_dense": kl_divergence(dense, logits)}
    if labels is not None:
        out["accuracy"] = float((logits.argmax(1) == labels).mean())
    return out


def bench(args) -> dict:
    import onnx_ir as ir

    from optin_onnx.analysis import analyze_graph
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import mac_model, total_macs
    from optin_onnx.iterate import at_levels
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import dummy_feeds, probe
    from optin_onnx.reconstruct import reconstruct
    from optin_onnx.report import compare_latency, latency_entry
    from optin_onnx.rewrite import rewrite
    from optin_onnx.scoring.baselines import score_magnitude, score_random
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
    from optin_onnx.search import search

    t = target(args.target, args.net, args.samples)
    name = "input"
    m = as_model(t.path)
    structure = analyze_graph(m, probe(m, dummy_feeds(m, like={name: t.calib})))
    cal = make_calibration({name: t.calib})
    macs = mac_model(m, structure, 0, like={name: t.calib})
    dense_proto = ir.to_proto(m)
    dense = outputs(dense_proto, t.evaluate)
    record = {"model": t.description, "calibration_images": int(len(t.calib)),
              "eval_images": int(len(t.evaluate)), "blocks": len(structure.blocks),
              "channels": sum(b.n_units for b in structure.blocks),
              "dense": metrics(dense, dense, t.labels), "dense_macs": macs.total,
              "neuron_group": args.neuron_group, "channel_multiple": args.channel_multiple,
              "methods": {}, "score_seconds": {}, "latency": {}}
    scored: dict[str, list] = {}
    chains: dict[str, dict] = {}  # with --round-step: method -> {level: selection}

    def select(importance, level, alive=None):
        return search(structure, importance, macs, level,
                      channel_multiple=args.channel_multiple, alive=alive)

    for method in args.methods:
        t0 = time.perf_counter()
        scoring = method in ("optin", "local", "optin+ls")
        if method == "optin+ls" and "optin" in scored:
            runs = scored["optin"]
            if "optin" in chains:
                chains[method] = chains["optin"]
        elif scoring:
            cfg = ScoreConfig(neuron_group=args.neuron_group, feature_kind=args.feature,
                              features="local" if method == "local" else "trajectory",
                              teacher=args.round_teacher)
            if args.round_step:
                chains[method] = at_levels(
                    lambda base, cfg=cfg: score_fast(m, structure, cal, cfg, base=base),
                    select, args.levels, args.round_step)
                runs = [None]
            else:
                runs = [score_fast(m, structure, cal, cfg).importance]
        elif method == "magnitude":
            runs = [score_magnitude(m, structure).importance]
        else:
            runs = [score_random(structure, seed).importance for seed in (0, 1, 2)]
        scored[method] = runs
        record["score_seconds"][method] = time.perf_counter() - t0
        print(f"{method}: scored in {record['score_seconds'][method]:.0f} s", flush=True)
        rows = []
        for level in args.levels:
            per_seed = []
            for importance in runs:
                sel = chains[method][round(level, 6)] if method in chains else \
                    select(importance, level)
                base = reconstruct(m, structure, sel.keep, cal).model if method == "optin+ls" \
                    else m
                slim = ir.to_proto(rewrite(base, structure, sel.keep))
                got = metrics(outputs(slim, t.evaluate), dense, t.labels)
                got["flops_kept"] = total_macs(ir.from_proto(slim), 0,
                                               like={name: t.calib}) / macs.total
                per_seed.append(got)
                if method == "optin" and args.latency_seconds:
                    cases = {"flops_kept": got["flops_kept"]}
                    for batch in (1, 32):
                        feeds = {name: t.evaluate[:batch]}
                        before, after = compare_latency(dense_proto, slim, feeds,
                                                        max_seconds=args.latency_seconds)
                        cases[f"b{batch}"] = latency_entry(before, after)
                    record["latency"][str(level)] = cases
            row = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
            row["level"] = level
            rows.append(row)
            print(f"{method} @ {level}: {row}", flush=True)
        settings = [f"feature {args.feature}"] if scoring and args.feature != "auto" else []
        settings += ([f"rounds of {args.round_step:g}, teacher {args.round_teacher}"]
                     if method in chains else [])
        name = method + (f" ({', '.join(settings)})" if settings else "")
        record["methods"][name] = rows
        record["score_seconds"][name] = record["score_seconds"].pop(method)
    return record


def _headline(record: dict) -> tuple[str, str]:
    """(metric key, axis label): accuracy where labels exist, else top-1 agreement."""
    if "accuracy" in record["dense"]:
        return "accuracy", "test accuracy (%)"
    return "agreement", "top-1 agreement with dense (%)"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _headline(record)
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for method, rows in record["methods"].items():
        ax.plot([r["flops_kept"] for r in rows], [100 * r[key] for r in rows], "o-", label=method)
    ax.axhline(100 * record["dense"][key], color="gray", ls="--", label="dense")
    ax.set_xlabel("fraction of FLOPs kept (measured)")
    ax.set_ylabel(label)
    ax.set_title(record["model"])
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: rows pile up
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(record: dict) -> str:
    key, _ = _headline(record)
    # Every level any row has (rows merged from runs at other levels leave their other cells blank).
    levels = sorted({r["level"] for rows in record["methods"].values() for r in rows}, reverse=True)
    lines = ["| method | score time | " + " | ".join(f"{lv:g}" for lv in levels) + " |",
             "|---" * (len(levels) + 2) + "|"]
    for method, rows in record["methods"].items():
        cells = []
        at = {r["level"]: r for r in rows}
        for level in levels:
            r = at.get(level)
            if r is None:
                cells.append("")
                continue
            first = f"{100 * r[key]:.1f}" + (f" (agr {100 * r['agreement']:.0f}"
                                              if key == "accuracy" else
                                              f" (top-5 {100 * r['top5_agreement']:.0f}")
            cells.append(f"{first}, KL {r['kl_to_dense']:.3f}; FLOPs {r['flops_kept']:.2f})")
        when = ("optin's" if method.startswith("optin+ls")
                else f"{record['score_seconds'][method]:.0f} s")
        lines.append(f"| {method} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(record: dict) -> str:
    if not record["latency"]:
        return ""
    lines = ["| FLOPs kept | ideal speed-up | batch 1 | batch 32 |", "|---|---|---|---|"]
    for cases in record["latency"].values():
        kept = cases["flops_kept"]
        cells = [f"{c['before_ms']:.1f} -> {c['after_ms']:.1f} ms ({c['speedup']:.2f}x)"
                 for key, c in cases.items() if key != "flops_kept"]
        lines.append(f"| {kept:.2f} | {1 / kept:.2f}x | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def update_results(record: dict, tag: str, results: Path) -> None:
    """Replace the block between this target's markers in docs/RESULTS.md."""
    from tools.bench_accuracy import replace_block

    key, _ = _headline(record)
    what = ("test accuracy % (agreement with dense predictions %" if key == "accuracy" else
            "top-1 agreement with the dense model % (top-5 agreement %")
    body = (f"Dense: {json.dumps({k: round(v, 4) for k, v in record['dense'].items()})} "
            f"on {record['eval_images']} held-out images; {record['calibration_images']} "
            f"calibration images; {record['blocks']} channel groups, {record['channels']} "
            f"channels, {record['dense_macs'] / 1e6:.1f} M MACs; channel counts kept multiples of "
            f"{record['channel_multiple']}. Cells: {what}, KL to the dense "
            f"logits; FLOPs measured on the rewritten graph). Command: `{record['command']}`.\n\n"
            f"{table(record)}\n{latency_table(record)}\n"
            f"![{key} vs FLOPs](bench/vision_{tag}.png)")
    replace_block(results, f"vision:{tag}", body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_vision",
                                description=__doc__.splitlines()[0])
    p.add_argument("target", choices=["digits", "efficientnet"])
    p.add_argument("--net", default="mnist", choices=["mnist", "usps", "svhn"],
                   help="digit CNN (digits only)")
    p.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--samples", type=int, default=None,
                   help="calibration images (default: digits 64, efficientnet 32)")
    p.add_argument("--neuron-group", type=int, default=8,
                   help="channels scored in proxy-ordered groups of N (1 = exact)")
    p.add_argument("--feature", default="auto", choices=["auto", "blocks", "ffn"],
                   help="trajectory feature kind (rows named after it unless auto); ffn on a "
                        "CNN with a hidden classifier layer: that layer's output only")
    p.add_argument("--channel-multiple", type=int, default=8,
                   help="channel counts stay multiples of N (default 8, the tool's default)")
    p.add_argument("--round-step", type=float, default=0.0,
                   help="optin/optin+ls/local: prune in rounds of this FLOPs fraction, re-scoring "
                        "after each (optin_onnx.iterate; one chain serves every level); 0 = one shot")
    p.add_argument("--round-teacher", choices=["dense", "current"], default="current",
                   help="with --round-step: later rounds' teacher (ScoreConfig.teacher)")
    p.add_argument("--latency-seconds", type=float, default=0.0)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--merge", action="store_true",
                   help="add these rows (and latencies) to the existing record instead of "
                        "replacing it (e.g. a later latency run on an idle machine)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method {unknown[0]} (choose from {', '.join(METHODS)})")
    record = bench(args)
    record["command"] = "python -m tools.bench_vision " + " ".join(argv or sys.argv[1:])
    tag = args.target if args.target == "efficientnet" else f"digits_{args.net}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / f"vision_{tag}.json"
    if args.merge:
        from tools.bench_accuracy import merge_record

        record = merge_record(previous, record, ("methods", "score_seconds", "latency"))
    previous.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out / f"vision_{tag}.png")
    update_results(record, tag, out.parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
