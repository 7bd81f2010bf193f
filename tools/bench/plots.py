"""One plot per record: a curve per row (method and settings) of a metric against FLOPs kept."""
from __future__ import annotations

from pathlib import Path

from tools.bench.methods import OURS
from tools.bench.onnxsim import ONNXSIM

#: One colour per method across every plot; rows with other settings take their method's.
COLOURS = {m: f"C{i}" for i, m in enumerate((*OURS, *ONNXSIM))}


def plot(record: dict, path: Path, key: str, label: str, scale: float = 100.0,
         legend_beside: bool = False) -> None:
    """``scale * row[key]`` against each row's measured ``flops_kept``, the dense value as a line.

    A row with other settings than its method's defaults keeps the method's colour with a marker
    and line of its own; onnxsim's rows are dashed. ``legend_beside``: many rows, legend outside
    the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4) if legend_beside else (7, 4.5))
    variants: dict[str, int] = {}  # rows with other settings so far, per method
    for method, rows in record["methods"].items():
        rows = [r for r in rows if key in r]
        if not rows:
            continue
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
    ax.set_xlabel("fraction of FLOPs kept (measured)")
    ax.set_ylabel(label)
    ax.set_title(record["model"].split("(")[0].strip())
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    if legend_beside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
