"""Show one layer's attention as the analysis sees it: the nodes with their probe shapes, the
run-time tensors that enter from outside the layer (position biases, masks, rotary tables), and
every channel group started there with its barriers, consumers and fate (block, declined, or
dropped without a word). Issue 9's diagnoses are read off this.

    python -m tools.attention_pattern llama dynamo [--attention eager] [--scope REGEX]

``--scope`` selects the nodes by their scope: a TorchScript node's name
(``/model/layers.0/self_attn/MatMul``) or a dynamo node's torch name scope
(``model.layers.0.self_attn``); the default matches layer 0's attention of every zoo model.
"""
from __future__ import annotations

import argparse
import ast
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir

from models import zoo

DEFAULT_SCOPE = r"(?i)(layer|layers|h|blocks)[./]0[./][^/]*att"


def scope(node: ir.Node) -> str:
    """The module path a node came from: the dynamo exporter records it as metadata, the
    TorchScript exporter writes it into the node's name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return node.name
    path = ast.literal_eval(scopes)  # [..., module path, op name]
    return path[-2] if len(path) > 1 else node.name


def describe(v: ir.Value | None, probe: dict[str, np.ndarray], inside: set[str]) -> str:
    """``name[shape]``, a small constant's value, or where an outside run-time tensor comes
    from (``<-Expand``)."""
    from optin_onnx.graph import const_array

    if v is None:
        return "-"
    c = const_array(v)
    if c is not None:
        return f"const{list(c.shape)}" + (f"={c.reshape(-1).tolist()}" if c.size <= 6 else "")
    arr = probe.get(v.name)
    shape = list(np.shape(arr)) if arr is not None else "?"
    small = (f"={np.asarray(arr).reshape(-1).tolist()}" if arr is not None
             and np.asarray(arr).size <= 6 and np.asarray(arr).dtype.kind in "iu" else "")
    p = v.producer()
    origin = "" if p is not None and p.name in inside else \
        f" <-{p.op_type if p is not None else 'input'}"
    return f"{v.name}{shape}{small}{origin}"


def ancestry(v: ir.Value, probe: dict[str, np.ndarray], depth: int = 8) -> list[str]:
    """The chain of producers of ``v`` (first run-time input at each step), up to ``depth``."""
    from optin_onnx.graph import const_array

    out = []
    while depth and (p := v.producer()) is not None:
        ins = [i for i in p.inputs if i is not None]
        out.append(f"{p.op_type}{list(np.shape(probe[v.name])) if v.name in probe else ''}")
        live = [i for i in ins if const_array(i) is None]
        consts = [i for i in ins if const_array(i) is not None and const_array(i).size > 6]
        if consts:
            out[-1] += f"(table {list(const_array(consts[0]).shape)})"
        if not live:
            break
        v, depth = live[0], depth - 1
    return out[::-1]


def fates(model: ir.Model, values: dict[str, np.ndarray], structure) -> list[tuple[str, object]]:
    """Every group of the propagation (union-find roots) with what became of it: ``block NAME``,
    ``declined``, ``model width`` (listed in ``Structure.model_width``: the residual stream's
    projections), or, for a group with a head axis, ``DROPPED ...``: either listed as the model
    width (heads the user is told are the residual stream) or listed nowhere. Both are the
    analysis' worst outcome: heads exist and nothing says why they are not pruned."""
    from optin_onnx.analysis.propagate import propagated

    prop = propagated(model, values)
    known = {f"group@{b.sources[0]}": f"block {b.name}" for b in structure.blocks}
    known.update({d.name: "declined" for d in structure.declined})
    width = {d.name for d in structure.model_width}
    out = []
    for gid, g in prop.groups.items():
        if prop.find(gid) != gid or g.parts:
            continue
        name = f"group@{g.sources[0]}"
        if name in known:
            verdict = known[name]
        elif g.has_head:
            verdict = "DROPPED: " + ("listed as the model width" if name in width
                                     else "listed nowhere") + ", with a head axis"
        else:
            verdict = "model width" if name in width else "not a block"
        out.append((verdict, g))
    return out


def analyse(path: Path, feeds: dict[str, np.ndarray]):
    """``path`` analysed as ``optin_onnx.pipeline.analyze`` does (fused projections split, probed
    at the shapes of ``feeds``), keeping what :func:`fates` needs: (model, probe values,
    structure)."""
    from optin_onnx.analysis import analyze_graph
    from optin_onnx.passes.unfuse_projections import split_fused_projections
    from optin_onnx.pipeline import as_model
    from optin_onnx.probe import dummy_feeds, probe

    model = as_model(path)
    split_fused_projections(model)
    values = probe(model, dummy_feeds(model, like=feeds))
    return model, values, analyze_graph(model, values)


def show(path: Path, zm: zoo.ZooModel, pattern: str) -> None:
    model, values, structure = analyse(path, zm.feeds(4))
    nodes = [n for n in model.graph if re.search(pattern, scope(n)) and n.op_type != "Constant"]
    inside = {n.name for n in nodes}
    print(f"## {path.name}: {len(nodes)} nodes in scope /{pattern}/")
    outside: dict[str, ir.Value] = {}
    for n in nodes:
        ins = ", ".join(describe(v, values, inside) for v in n.inputs)
        outs = ", ".join(describe(v, values, inside) for v in n.outputs)
        print(f"  {n.op_type:<10} {n.name}: {ins} -> {outs}")
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if v is not None and (p is None or p.name not in inside) and \
                    v.name in values and np.asarray(values[v.name]).ndim >= 2:
                outside[v.name] = v
    print("  run-time tensors entering the scope (producer chains):")
    for name, v in outside.items():
        print(f"    {name}: {' -> '.join(ancestry(v, values))}")
    print("  groups started in scope:")
    for verdict, g in fates(model, values, structure):
        if not inside & set(g.sources):
            continue
        print(f"    {verdict}: sources {g.sources}, width {g.width}, unit {g.unit_size}, "
              f"head axis {g.has_head}, consumers {[c.node for c in g.consumers]}, "
              f"hard {g.hard}, natural {g.natural}")
        for reason in dict.fromkeys(g.barriers):
            print(f"      barrier: {reason}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=list(zoo.ZOO))
    p.add_argument("exporter", choices=list(zoo.EXPORTERS))
    p.add_argument("--attention", default="default", choices=["default", "eager"])
    p.add_argument("--scope", default=DEFAULT_SCOPE, help="regex over node scopes")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    zm = zoo.ZOO[args.arch](args.attention)
    with tempfile.TemporaryDirectory() as tmp:
        path = zoo.export(zm, Path(tmp) / f"{args.arch}-{args.exporter}.onnx", args.exporter)
        show(path, zm, args.scope)


if __name__ == "__main__":
    main()
