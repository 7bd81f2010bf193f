"""Accuracy (or embedding fidelity) against FLOPs kept, on reference models built from packaged
weights.

    python -m tools.bench_accuracy bbc|sentiment|embedding [--levels 0.9,0.8,0.7,0.6,0.5]
        [--methods ...] [--samples 32] [--neuron-group 8] [--lam 1] [--split test|val] [--merge]

Targets (:mod:`tools.bench.targets`): ``bbc`` (frozen MiniLM + logistic head, BBC News topics),
``sentiment`` (MiniLM fine-tuned on tweets), ``embedding`` (the plain all-MiniLM-L6-v2 sentence
embedding, mean-pooled and L2-normalised, evaluated on the BBC test texts: cosine to the dense
embedding and overlap of the top-10 nearest neighbours).

Methods (:mod:`tools.bench.methods`): ``optin``, ``optin+ls``, ``optin+refit``, ``optin+obs``
(the units within blocks re-chosen for the refit, ``--within refit``), ``local``, ``magnitude``,
``random`` (mean of 3 seeds), scored once on the calibration texts (the first ``--samples`` of the
training split), then one search + rewrite per FLOPs level; ``onnxsim-magnitude|wanda|heads`` are
onnx-simplifier's own pruning passes on onnxruntime's fused graph, their sparsity swept to the same
measured FLOPs (:mod:`tools.bench.onnxsim`).

``--split test`` evaluates on the held-out test split (never used for selection); ``--split val``
on a validation split drawn from the training texts after every calibration prefix
(:func:`tools.bench.targets.validation_split`), for choosing a configuration. Rows are named by
method plus whatever differs from the defaults (``optin (cal 128, lam 0.1)``). Writes
``docs/bench/accuracy_<target>[-val][-<attention>].json``, a PNG plot and the target's block of
docs/RESULTS.md.

The models are exported with transformers' default attention (issue 9: what users export), and
those records are named ``...-default-attn``; ``--attention eager`` rebuilds the eager exports the
records without that suffix were measured on (they predate issue 9), and merges into them.
"""
from __future__ import annotations

import json
import sys

from models.cache import attention_tag
from tools.bench import cli, metrics, results
from tools.bench.methods import OURS, SCORED, Settings
from tools.bench.onnxsim import ONNXSIM
from tools.bench.prepare import prepare
from tools.bench.run import run
from tools.bench.runner import outputs
from tools.bench.targets import TEXT, text_target

PROG = "python -m tools.bench_accuracy"


def row_name(method: str, samples: int, neuron_group: int, lam: float,
             round_step: float = 0.0, teacher: str = "current") -> str:
    """``method`` plus the settings that differ from :class:`~tools.bench.methods.Settings`'
    defaults (scoring settings apply to the trajectory and local scores only)."""
    d = Settings()
    parts = []
    scored = method in SCORED
    if samples != d.samples and (scored or method in ("onnxsim-wanda",)):
        parts.append(f"cal {samples}")
    if scored and neuron_group != d.neuron_group:
        parts.append(f"ng {neuron_group}")
    if scored and lam != d.lams[0]:
        parts.append(f"lam {lam:g}")
    if scored and round_step:
        parts.append(f"rounds of {round_step:g}, teacher {teacher}")
    return method + (f" ({', '.join(parts)})" if parts else "")


def bench(args) -> dict:
    """The record of one run: the header (model, data, dense metrics) and every method's rows."""
    import onnx_ir as ir

    t = text_target(args.model, args.samples, args.split, args.cache, args.attention)
    prep = prepare(t.path, t.calib, held=t.held)
    dense = outputs(ir.to_proto(prep.model), t.evaluate, t.batch)

    def measure(out):
        if t.kind == "embedding":
            return metrics.embedding(out, dense)
        return metrics.classification(out, dense, t.labels)

    settings = Settings(levels=tuple(args.levels), samples=args.samples,
                        neuron_group=args.neuron_group, lams=tuple(args.lam),
                        round_step=args.round_step, round_teacher=args.round_teacher,
                        reach=args.reach)
    rows, seconds = run(prep, t.path, args.methods, settings,
                        lambda proto: measure(outputs(proto, t.evaluate, t.batch)),
                        lambda method, lam, rounds: row_name(
                            method, args.samples, args.neuron_group, lam,
                            args.round_step if rounds else 0.0, args.round_teacher))
    return {"model": t.description, "export": t.path.name, "kind": t.kind, "split": args.split,
            "calibration_texts": args.samples, "eval_texts": t.eval_size,
            "seq_len_for_flops": prep.seq_len, "dense": measure(dense), "methods": rows,
            "score_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    p = cli.parser(PROG, __doc__, OURS)
    p.add_argument("model", choices=list(TEXT))
    p.add_argument("--samples", type=int, default=d.samples,
                   help="calibration texts (the first N of the training split)")
    p.add_argument("--lam", type=cli.floats, default=list(d.lams),
                   help="output-term weights; several give one row each from the same scores")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--reach", type=float, default=d.reach,
                   help="onnxsim: farthest measured FLOPs from a level that still counts as it")
    p.add_argument("--cache", default=None)
    p.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                   help="transformers' attention implementation of the exports (default: the "
                        "library's default)")
    args = p.parse_args(argv)
    cli.check_methods(p, args.methods, (*OURS, *ONNXSIM))
    key = args.model if args.split == "test" else f"{args.model}-{args.split}"
    if args.attention != "eager":  # eager records keep the names they had before issue 9
        key += f"-{attention_tag(args.attention)}"
    record = bench(args)
    # ("kind", "split", "eval_texts"): records written before these keys existed lack them
    record = cli.finish(record, argv, PROG, args.out, f"accuracy_{key}", args.merge,
                        ("methods", "score_seconds"),
                        lambda r, path: results.accuracy_block(r, key, path),
                        results.accuracy_headline(record), ("kind", "split", "eval_texts"))
    print(json.dumps(record["dense"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
