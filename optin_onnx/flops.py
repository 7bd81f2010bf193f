"""Stage *count*: multiply-accumulates per node and per prunable unit, from the graph itself.

Shapes come from one onnxruntime run at batch 1 and the requested sequence length, so whatever the
exporter wrote (computed Reshape targets included) is counted as it will execute. Only the matrix
products are counted (MatMul, Gemm, Conv, and the products inside onnxruntime's fused attention
ops): the usual definition of MACs, and all that pruning heads and neurons changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from optin_onnx.analysis import Structure
from optin_onnx.analysis.structure import Factor
from optin_onnx.probe import PROBE_SEQ, dummy_feeds
from optin_onnx.runtime import run_all_values

_HEAVY = {("", "MatMul"), ("", "Gemm"), ("", "Conv"), ("", "ConvTranspose"),
          ("", "Attention"), ("com.microsoft", "Attention"),
          ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "GroupQueryAttention")}


@dataclass
class MacModel:
    """MACs of the model as a function of the kept units per block.

    Every counted node contributes its dense MACs times the kept fraction of each axis it has in
    some block: one block for a transformer's projections (affine in the kept units:
    ``base + sum(unit[b] * k_b)``), two for a conv between two channel groups (it shrinks with
    its input and its output channels: a product). Blocks joined on one axis by a channel Concat
    form one factor, their kept channels summed.
    """

    total: int
    base: int
    unit: dict[str, float]  # block name -> MACs per kept unit, others kept whole
    seq_len: int
    # (dense MACs, factors): each factor is one axis of the node (Structure.mac_factors)
    terms: list[tuple[float, tuple[Factor, ...]]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # block name -> units when dense
    nodes: dict[str, int] = field(default_factory=dict)  # node name -> its dense MACs

    def term(self, term: tuple[float, tuple[Factor, ...]], kept: dict[str, int]) -> float:
        m, factors = term
        for blocks, fixed in factors:
            m *= (sum(kept.get(b, self.sizes[b]) for b in blocks) + fixed) / \
                (sum(self.sizes[b] for b in blocks) + fixed)
        return m

    def macs(self, kept: dict[str, int]) -> float:
        """Predicted MACs; blocks missing from ``kept`` stay whole."""
        if not self.terms:  # a model given by per-unit costs alone
            return self.base + sum(self.unit[b] * k for b, k in kept.items())
        return self.base + sum(self.term(t, kept) for t in self.terms)

    def fraction(self, kept: dict[str, int]) -> float:
        return self.macs(kept) / self.total

    @property
    def affine(self) -> bool:
        """True when every node scales with one block (every transformer): ``unit`` is exact."""
        return all(len(factors) == 1 and len(factors[0][0]) == 1 and not factors[0][1]
                   for _, factors in self.terms)


def node_macs(model: ir.Model, seq_len: int, like: dict[str, np.ndarray] | None = None
              ) -> dict[str, int]:
    """MACs of every matrix-product node at batch 1 and ``seq_len`` (by node name)."""
    heavy = [n for n in model.graph
             if (n.domain if n.domain != "ai.onnx" else "", n.op_type) in _HEAVY]
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
        elif n.op_type == "Attention" and n.domain == "com.microsoft":  # x @ W_qkv, Q K^T, P V
            x, w = shape(n.inputs[0]), shape(n.inputs[1])
            sizes = n.attributes["qkv_hidden_sizes"].value if "qkv_hidden_sizes" in n.attributes \
                else [w[1] // 3] * 3
            s = int(np.prod(x[:-1]))
            out[n.name] = s * x[-1] * w[1] + s * x[-2] * (sizes[0] + sizes[2])
        elif n.op_type in ("MultiHeadAttention", "Attention"):  # Q K^T and P V per head
            q, k = shape(n.inputs[0]), shape(n.inputs[1])
            out[n.name] = int(np.prod(q)) * k[-2] + int(np.prod(o)) * k[-2]
        elif n.op_type == "GroupQueryAttention":  # Q K^T and P V over past + new keys
            present = n.outputs[1] if len(n.outputs) > 1 and n.outputs[1] is not None else None
            keys = shape(present)[2] if present is not None else shape(n.inputs[1])[-2]
            out[n.name] = (int(np.prod(shape(n.inputs[0]))) + int(np.prod(o))) * keys
        else:  # Conv / ConvTranspose: every output element sums Cin/group * kernel products
            w = shape(n.inputs[1])
            out[n.name] = int(np.prod(o)) * int(np.prod(w[1:])) if n.op_type == "Conv" \
                else int(np.prod(shape(n.inputs[0]))) * int(np.prod(w[1:]))
    return out


def total_macs(model: ir.Model, seq_len: int, like: dict[str, np.ndarray] | None = None) -> int:
    return sum(node_macs(model, seq_len, like).values())


def mac_model(model: ir.Model, structure: Structure, seq_len: int,
              like: dict[str, np.ndarray] | None = None) -> MacModel:
    """Attribute each node's matrix products to the blocks on its axes (a node's MACs are linear
    in the width of each axis: ``Structure.mac_factors``)."""
    per_node = node_macs(model, seq_len, like)
    total = sum(per_node.values())
    terms = [(float(per_node[n]), tuple(factors))
             for n, factors in structure.mac_factors.items() if n in per_node]
    unit = {b.name: sum(m for m, factors in terms if any(b.name in f[0] for f in factors))
            / b.n_units for b in structure.blocks}
    base = total - sum(m for m, _ in terms)
    return MacModel(total=total, base=int(round(base)), unit=unit, seq_len=seq_len, terms=terms,
                    sizes={b.name: b.n_units for b in structure.blocks}, nodes=per_node)
