"""Stage *count*: multiply-accumulates per node and per prunable unit, from the graph itself.

Shapes come from one onnxruntime run at batch 1 and the requested sequence length, so whatever the
exporter wrote (computed Reshape targets included) is counted as it will execute. Only the matrix
products are counted (MatMul, Gemm, Conv): the usual definition of MACs, and all that pruning heads
and neurons changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.probe import PROBE_SEQ, dummy_feeds, run_all_values

_HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


@dataclass
class MacModel:
    """MACs of the model as an affine function of the kept units: ``base + sum(unit[b] * k_b)``."""

    total: int
    base: int
    unit: dict[str, float]  # block name -> MACs per kept unit
    seq_len: int

    def macs(self, kept: dict[str, int]) -> float:
        return self.base + sum(self.unit[b] * k for b, k in kept.items())

    def fraction(self, kept: dict[str, int]) -> float:
        return self.macs(kept) / self.total


def node_macs(model: ir.Model, seq_len: int, like: dict[str, np.ndarray] | None = None
              ) -> dict[str, int]:
    """MACs of every MatMul/Gemm/Conv node at batch 1 and ``seq_len`` (by node name)."""
    heavy = [n for n in model.graph if n.op_type in _HEAVY and n.domain in ("", "ai.onnx")]
    names = sorted({v.name for n in heavy for v in (*n.inputs, *n.outputs)
                    if v is not None and v.const_value is None})
    feeds = dummy_feeds(model, batch=1, seq=seq_len or PROBE_SEQ, like=like)
    values = run_all_values(ir.to_proto(model), feeds, names=[n for n in names if n not in feeds])
    values.update(feeds)

    def shape(v: ir.Value) -> tuple[int, ...]:
        if v.const_value is not None:
            return tuple(v.const_value.shape)
        return values[v.name].shape

    out = {}
    for n in heavy:
        o = shape(n.outputs[0])
        if n.op_type == "MatMul":
            out[n.name] = int(np.prod(o)) * shape(n.inputs[0])[-1]
        elif n.op_type == "Gemm":
            a = shape(n.inputs[0])
            k = a[0] if (n.attributes.get("transA") and n.attributes["transA"].value) else a[1]
            out[n.name] = int(np.prod(o)) * k
        else:  # Conv / ConvTranspose: every output element sums Cin/group * kernel products
            w = shape(n.inputs[1])
            out[n.name] = int(np.prod(o)) * int(np.prod(w[1:])) if n.op_type == "Conv" \
                else int(np.prod(shape(n.inputs[0]))) * int(np.prod(w[1:]))
    return out


def total_macs(model: ir.Model, seq_len: int, like: dict[str, np.ndarray] | None = None) -> int:
    return sum(node_macs(model, seq_len, like).values())


def mac_model(model: ir.Model, structure: Structure, seq_len: int,
              like: dict[str, np.ndarray] | None = None) -> MacModel:
    """Attribute each block's matrix products to its units (they scale linearly with the width)."""
    per_node = node_macs(model, seq_len, like)
    total = sum(per_node.values())
    unit, claimed = {}, set()
    for b in structure.blocks:
        mine = [n for n in b.nodes if n in per_node and n not in claimed]
        claimed.update(mine)
        unit[b.name] = sum(per_node[n] for n in mine) / b.n_units
    base = total - sum(unit[b.name] * b.n_units for b in structure.blocks)
    return MacModel(total=total, base=int(round(base)), unit=unit, seq_len=seq_len)
