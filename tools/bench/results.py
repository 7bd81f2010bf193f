"""The generated blocks of docs/RESULTS.md: each benchmark owns the text between its
``<!-- tag -->`` markers, and the hand-written analysis around them is never touched."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools.bench.metrics import NEIGHBOURS


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


def plotted(record: dict) -> bool:
    """A plot only where there is a curve: one FLOPs level is all table."""
    return len({r["level"] for rows in record["methods"].values() for r in rows}) > 1


# ---------------------------------------------------------------------------------------------
# Text models (tools.bench_accuracy): accuracy or embedding fidelity


def accuracy_headline(record: dict) -> tuple[str, str, float]:
    """(metric key, axis label, scale) plotted for a text record."""
    if record.get("kind") == "embedding":
        return "cosine", "mean cosine to the dense embedding", 1.0
    return "accuracy", f"{record.get('split', 'test')} accuracy (%)", 100.0


def _accuracy_cell(record: dict, r: dict) -> str:
    if "note" in r:
        return r["note"]
    off = f"; at {r['flops_kept']:.3f}" if abs(r["flops_kept"] - r["level"]) > 0.005 else ""
    if record.get("kind") == "embedding":
        return f"{r['cosine']:.3f} (NN {100 * r['neighbour_overlap']:.0f}{off})"
    dense = record["dense"]["accuracy"]
    digits = 1 if record.get("split") == "val" else 0  # validation picks by agreement
    return (f"{100 * r['accuracy']:.1f} ({100 * (r['accuracy'] - dense):+.2f}; "
            f"agr {100 * r['agreement']:.{digits}f}, KL {r['kl_to_dense']:.3f}{off})")


def _accuracy_time(record: dict, method: str, rows: list[dict]) -> str:
    """Scoring (or fusion) seconds, once, + mean seconds per level (search + rewrite, or sweep +
    prune); ``n/r`` where the record predates that timing."""
    per_level = [r["seconds"] for r in rows if "seconds" in r]
    score = record["score_seconds"].get(method)
    first = "n/r" if score is None else f"{score:.0f}"
    return f"{first} + {np.mean(per_level):.1f}" if per_level else f"{first} + n/r"


def accuracy_table(record: dict) -> str:
    """Markdown: one row per method, one column per FLOPs level any row has (a row from a run at
    fewer levels leaves the others blank), plus the time it took."""
    levels = sorted({r["level"] for rows in record["methods"].values() for r in rows},
                    reverse=True)
    head = "| method | time (s) | " + " | ".join(f"{lv:g}" for lv in levels) + " |"
    lines = [head, "|---" * (len(levels) + 2) + "|"]
    for method, rows in record["methods"].items():
        at = {r["level"]: r for r in rows}
        cells = [_accuracy_cell(record, at[lv]) if lv in at else "" for lv in levels]
        lines.append(f"| {method} | {_accuracy_time(record, method, rows)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _unrecorded(record: dict) -> bool:
    return any(m not in record["score_seconds"] or any("seconds" not in r for r in rows)
               for m, rows in record["methods"].items())


def _accuracy_intro(record: dict) -> str:
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


def accuracy_block(record: dict, key: str, results: Path) -> None:
    """Replace the ``accuracy:<key>`` block of ``results`` with a fresh table."""
    body = f"{_accuracy_intro(record)} Command: `{record['command']}`.\n\n{accuracy_table(record)}"
    if plotted(record):
        body += f"\n\n![{accuracy_headline(record)[1]} vs FLOPs](bench/accuracy_{key}.png)"
    replace_block(results, f"accuracy:{key}", body)


# ---------------------------------------------------------------------------------------------
# CNNs (tools.bench_vision): accuracy or agreement, and latency per level


def vision_headline(record: dict) -> tuple[str, str]:
    """(metric key, axis label): accuracy where labels exist, else top-1 agreement."""
    if "accuracy" in record["dense"]:
        return "accuracy", "test accuracy (%)"
    return "agreement", "top-1 agreement with dense (%)"


def vision_table(record: dict) -> str:
    """Markdown: one row per method, one column per level any row has (rows merged from runs at
    other levels leave their other cells blank)."""
    key, _ = vision_headline(record)
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
        when = ("optin's" if method.startswith(("optin+ls", "optin+refit", "optin+obs"))
                else f"{record['score_seconds'][method]:.0f} s")
        lines.append(f"| {method} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(record: dict) -> str:
    """Markdown: OPTIN's model of each level against the dense one ('' without latency)."""
    if not record["latency"]:
        return ""
    lines = ["| FLOPs kept | ideal speed-up | batch 1 | batch 32 |", "|---|---|---|---|"]
    for cases in record["latency"].values():
        kept = cases["flops_kept"]
        cells = [f"{c['before_ms']:.1f} -> {c['after_ms']:.1f} ms ({c['speedup']:.2f}x)"
                 for key, c in cases.items() if key != "flops_kept"]
        lines.append(f"| {kept:.2f} | {1 / kept:.2f}x | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def vision_block(record: dict, tag: str, results: Path) -> None:
    """Replace the ``vision:<tag>`` block of ``results``."""
    key, _ = vision_headline(record)
    what = ("test accuracy % (agreement with dense predictions %" if key == "accuracy" else
            "top-1 agreement with the dense model % (top-5 agreement %")
    body = (f"Dense: {json.dumps({k: round(v, 4) for k, v in record['dense'].items()})} "
            f"on {record['eval_images']} held-out images; {record['calibration_images']} "
            f"calibration images; {record['blocks']} channel groups, {record['channels']} "
            f"channels, {record['dense_macs'] / 1e6:.1f} M MACs; channel counts kept multiples of "
            f"{record['channel_multiple']}. Cells: {what}, KL to the dense "
            f"logits; FLOPs measured on the rewritten graph). Command: `{record['command']}`.\n\n"
            f"{vision_table(record)}\n{latency_table(record)}")
    if plotted(record):
        body += f"\n![{key} vs FLOPs](bench/vision_{tag}.png)"
    replace_block(results, f"vision:{tag}", body)
