"""Competitor pruners for the accuracy benchmark (not part of the core package).

:func:`onnxsim_prune` runs onnx-simplifier's own structured pruning (``onnxsim.pruning``, 0.8.1) on
an ONNX encoder and reports what it did. onnxsim prunes per layer by a uniform ``sparsity`` (the
fraction of each layer's heads / FFN neurons to drop), ranked by weight L2 norm (``magnitude``) or
by Wanda's |W| x ||X|| over calibration inputs (``wanda``); it has no FLOPs budget of its own.

What it can match (measured: tiny BERT exports of tests/conftest.py and all-MiniLM-L6-v2,
TorchScript export, ``--head pool``):

- the plain TorchScript or dynamo export, and its onnxsim'd form: nothing. The exact-erf GELU is
  ``Div -> Erf -> Add -> Mul(x, .) -> Mul`` (a fan-out onnxsim declines) and the decomposed
  attention is not matched, so every ``apply_*`` returns the graph unchanged.
- after onnxruntime's BERT fusion (``onnxruntime.transformers.optimizer``, with the head count and
  hidden size from optin-onnx's analysis; its own detection fails on these exports and then fuses
  no Attention): TorchScript export -> ``Attention`` + ``BiasGelu``; onnxsim then removes heads
  (``apply_attention_head_pruning``) and FFN neurons through ``BiasGelu``
  (``apply_structured_pruning``), the same fraction in every layer. The dynamo export fuses only
  ``BiasGelu`` (neurons pruned, heads not); the onnxsim'd export fuses to ``Gelu`` after a
  ``Reshape -> Gemm -> Reshape`` and nothing is matched.
- the result uses com.microsoft contrib ops: it runs in onnxruntime only.

This wrapper tries the graph as given and, if nothing was pruned, the fused graph (``fused`` in
the result); if neither prunes, :class:`CannotPrune` says why. Variants: ``magnitude`` and
``wanda`` prune heads and FFN neurons, ``heads`` only heads (``apply_attention_head_pruning``).

:func:`prune_to_flops` gives onnxsim the FLOPs budget it lacks: it sweeps the sparsity until the
fused graph's MACs (:func:`fused_macs`, optin-onnx's own counter plus the fused ``Attention`` ops
counted from their weights) reach a fraction of the dense model's.

    python -m tools.competitors MODEL.onnx OUT.onnx --sparsity 0.4 [--variant wanda --calib c.npz]
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import onnx

VARIANTS = ("magnitude", "wanda", "heads")
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Attention": 1}  # op -> slot of its constant weight


class CannotPrune(RuntimeError):
    """onnxsim cannot prune this graph; the message starts 'onnxsim cannot prune this graph: '."""


def _linear_macs_per_token(model: onnx.ModelProto) -> int:
    """Multiply-adds per token of every MatMul/Gemm/Attention against a constant weight (= the
    weight's element count; attention's s^2 terms are not included)."""
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        slot = _WEIGHT_OPS.get(n.op_type)
        if slot is not None and len(n.input) > slot and n.input[slot] in inits:
            total += int(np.prod(inits[n.input[slot]].dims))
    return total


def param_count(model: onnx.ModelProto) -> int:
    """Elements of every initializer."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _units(model: onnx.ModelProto) -> dict[str, int]:
    """Heads of every fused Attention and widths of every weight feeding a BiasGelu (FFN)."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Attention":
            out[f"{n.name} heads"] = next(a.i for a in n.attribute if a.name == "num_heads")
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            out[f"{n.name} out"] = int(inits[n.input[1]].dims[-1])
    return out


def _heads_and_hidden(model_path: str) -> tuple[int, int]:
    """Head count and hidden size from optin-onnx's analysis (onnxruntime's own detection fails on
    these exports, and without them it fuses no Attention)."""
    import optin_onnx

    _, structure = optin_onnx.analyze(model_path)
    att = [b for b in structure.blocks if b.kind == "attention"]
    if not att:
        return 0, 0
    return att[0].n_units, att[0].n_units * att[0].unit_size


def ort_fuse(model_path: str) -> onnx.ModelProto:
    """onnxruntime's BERT fusion (Attention, SkipLayerNormalization, BiasGelu, ...) of an export,
    with the head count and hidden size from optin-onnx's analysis."""
    from onnxruntime.transformers import optimizer

    heads, hidden = _heads_and_hidden(model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizer.optimize_model(model_path, model_type="bert", num_heads=heads,
                                       hidden_size=hidden, opt_level=0, use_gpu=False)
    return opt.model


def feeds_for(model: onnx.ModelProto, calib: Mapping[str, np.ndarray], n: int) -> list[dict]:
    """Per-sample feed dicts (batch 1) for onnxsim's Wanda calibration, cast to the graph's dtypes
    and cut to each sample's real length when there is an ``attention_mask`` (Wanda's activation
    norms would otherwise count the padding tokens)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    names = {i.name: tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
             for i in model.graph.input}
    count = min(n, len(next(iter(calib.values()))))
    out = []
    for i in range(count):
        length = None
        if "attention_mask" in calib:
            length = max(1, int(np.asarray(calib["attention_mask"][i]).sum()))
        out.append({k: np.asarray(calib[k][i:i + 1])[:, :length].astype(dt)
                    for k, dt in names.items()})
    return out


def _runs(model: onnx.ModelProto, feeds: dict) -> tuple[bool, str]:
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds.items() if k in names})
        return True, ""
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def apply(model: onnx.ModelProto, head_sparsity: float, neuron_sparsity: float, variant: str,
          calib_feeds: list[dict] | None = None) -> onnx.ModelProto:
    """onnxsim's head pruning at ``head_sparsity``, then (unless ``variant`` is ``heads``) its FFN
    channel pruning at ``neuron_sparsity``; a sparsity of 0 skips that pass (onnxsim would still
    keep every unit, at the cost of a pass). ``model`` is not modified."""
    from onnxsim import pruning as P

    m = model
    if variant == "wanda":
        if head_sparsity > 0:
            m = P.apply_attention_head_wanda_pruning(m, calibration_data=calib_feeds,
                                                     num_samples=len(calib_feeds),
                                                     sparsity=head_sparsity)
        if neuron_sparsity > 0:
            m = P.apply_structured_wanda_pruning(m, calibration_data=calib_feeds,
                                                 num_samples=len(calib_feeds),
                                                 sparsity=neuron_sparsity)
    else:
        if head_sparsity > 0:
            m = P.apply_attention_head_pruning(m, sparsity=head_sparsity)
        if neuron_sparsity > 0 and variant == "magnitude":
            m = P.apply_structured_pruning(m, sparsity=neuron_sparsity)
    if m is model:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    return m


def onnxsim_prune(model_path, out_path, flops_or_sparsity: float, variant: str = "magnitude",
                  calib: Mapping[str, np.ndarray] | None = None, *, fuse: str = "auto",
                  samples: int = 8) -> dict:
    """Prune ``model_path`` with onnxsim.pruning and write ``out_path``; returns what it did.

    ``flops_or_sparsity``: onnxsim's ``sparsity``, the fraction of every layer's heads and FFN
    neurons to drop (onnxsim has no FLOPs budget; the achieved ratio of linear MACs is reported as
    ``linear_macs_ratio``). ``variant``: magnitude | wanda (wanda needs ``calib``, arrays per graph
    input, first axis = sample). ``fuse``: auto (the graph as given, then onnxruntime's BERT fusion
    if onnxsim pruned nothing) | never | always.

    Raises :class:`CannotPrune` ("onnxsim cannot prune this graph: <reason>") when nothing could be
    pruned, and ValueError on bad arguments.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 0.0 < flops_or_sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {flops_or_sparsity}")
    if variant == "wanda" and calib is None:
        raise ValueError("the wanda variant needs calibration inputs (calib)")
    if fuse not in ("auto", "never", "always"):
        raise ValueError(f"fuse must be auto, never or always, got {fuse!r}")
    t0 = time.perf_counter()
    original = onnx.load(str(model_path))
    feeds = feeds_for(original, calib, samples) if calib is not None else None
    tries: list[tuple[bool, onnx.ModelProto]] = []
    if fuse != "always":
        tries.append((False, original))
    if fuse != "never":
        tries.append((True, None))
    attempts = []
    for fused, base in tries:
        if base is None:
            try:
                base = ort_fuse(str(model_path))
            except Exception as e:  # noqa: BLE001
                attempts.append(f"onnxruntime BERT fusion failed ({type(e).__name__}: {e})")
                continue
        ops = sorted({n.op_type for n in base.graph.node if n.domain == "com.microsoft"})
        calib_feeds = feeds_for(base, calib, samples) if calib is not None else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                slim = apply(base, flops_or_sparsity, flops_or_sparsity, variant, calib_feeds)
        except Exception as e:  # noqa: BLE001
            attempts.append(f"{'fused' if fused else 'as given'}: onnxsim raised "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        if param_count(slim) == param_count(base):
            where = f"fused graph ({', '.join(ops)})" if fused else "graph as given"
            attempts.append(f"{where}: no head or channel matched")
            continue
        onnx.save(slim, str(out_path))
        probe = feeds[0] if feeds else _dummy_feeds(base)
        ok, err = _runs(slim, probe)
        before, after = _units(base), _units(slim)
        return {
            "tool": "onnxsim.pruning", "variant": variant, "sparsity": flops_or_sparsity,
            "fused": fused, "fused_ops": ops, "tried": attempts,
            "params_before": param_count(original), "params_after": param_count(slim),
            "linear_macs_per_token_before": _linear_macs_per_token(base),
            "linear_macs_per_token_after": _linear_macs_per_token(slim),
            "linear_macs_ratio": _linear_macs_per_token(slim) / _linear_macs_per_token(base),
            "changed_units": {k: [before[k], after.get(k)] for k in before
                              if after.get(k) != before[k]},
            "runs_in_onnxruntime": ok, "error": err, "seconds": time.perf_counter() - t0,
        }
    raise CannotPrune("onnxsim cannot prune this graph: " + "; ".join(attempts))


def fused_macs(model: onnx.ModelProto, seq_len: int, like: Mapping[str, np.ndarray] | None = None
               ) -> int:
    """MACs at batch 1 and ``seq_len`` tokens of a graph onnxruntime's BERT fusion produced:
    optin-onnx's own counter (:func:`optin_onnx.flops.total_macs`) counts the products inside
    ``com.microsoft`` Attention and MultiHeadAttention as the unfused export's, so a dense fused
    graph counts exactly as many MACs as the export it came from."""
    import onnx_ir as ir

    from optin_onnx.flops import total_macs

    return total_macs(ir.from_proto(model), seq_len, like=dict(like) if like else None)


def _closest(f: Callable[[float], float], target: float, lo: float, hi: float, steps: int
             ) -> tuple[float, float]:
    """Bisection on a non-increasing ``f`` over [lo, hi]; the visited ``(x, f(x))`` closest to
    ``target`` (f is a step function: the target itself may not be reachable)."""
    best = min(((lo, f(lo)), (hi, f(hi))), key=lambda p: abs(p[1] - target))
    for _ in range(steps):
        mid = (lo + hi) / 2
        fm = f(mid)
        if abs(fm - target) < abs(best[1] - target):
            best = (mid, fm)
        if fm > target:
            lo = mid
        else:
            hi = mid
    return best


def prune_to_flops(base: onnx.ModelProto, level: float, variant: str,
                   ratio: Callable[[onnx.ModelProto], float], calib_feeds: list[dict] | None = None,
                   steps: int = 12) -> dict:
    """Sweep onnxsim's sparsity until ``ratio(pruned)`` (MACs kept, measured) is closest to
    ``level``; returns ``{"model", "head_sparsity", "neuron_sparsity", "flops_kept"}``.

    The sweep prunes by magnitude (no calibration runs): Wanda drops the same number of units per
    layer at the same sparsity, only other ones, so its ratio is the same (the returned
    ``flops_kept`` is measured on the final model of ``variant`` itself). ``magnitude`` / ``wanda``:
    first one sparsity for heads and neurons (onnxsim's usual call), then, heads fixed, the neuron
    sparsity alone, since a head is a large step of a layer's MACs. ``heads``: only heads exist to
    drop, so levels below what one kept head per layer costs are out of reach and the closest
    achievable ratio is returned.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "wanda" and not calib_feeds:
        raise ValueError("the wanda variant needs calibration feeds")
    probe = "heads" if variant == "heads" else "magnitude"
    hs, _ = _closest(lambda s: ratio(apply(base, s, s, probe)), level, 0.0, 0.99, steps)
    ns = 0.0
    if variant != "heads":
        ns, _ = _closest(lambda s: ratio(apply(base, hs, s, probe)), level, 0.0, 0.999, steps)
    slim = apply(base, hs, ns, variant, calib_feeds)
    return {"model": slim, "head_sparsity": hs, "neuron_sparsity": ns, "flops_kept": ratio(slim)}


def _dummy_feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 16) -> dict:
    from onnx.helper import tensor_dtype_to_np_dtype

    out = {}
    for i in model.graph.input:
        dt = tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        dims = [d.dim_value if d.dim_value else (batch if k == 0 else seq)
                for k, d in enumerate(i.type.tensor_type.shape.dim)]
        if np.issubdtype(dt, np.integer):
            arr = np.ones(dims, dtype=dt) if "mask" in i.name else np.zeros(dims, dtype=dt)
            if "input_ids" in i.name:
                arr = np.random.default_rng(0).integers(1, 100, size=dims).astype(dt)
        else:
            arr = np.random.default_rng(0).standard_normal(dims).astype(dt)
        out[i.name] = arr
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--variant", choices=VARIANTS, default="magnitude")
    ap.add_argument("--calib", help=".npz, one array per graph input (needed by wanda)")
    ap.add_argument("--fuse", choices=["auto", "never", "always"], default="auto")
    a = ap.parse_args(argv)
    calib = dict(np.load(a.calib)) if a.calib else None
    try:
        print(json.dumps(onnxsim_prune(a.model, a.output, a.sparsity, a.variant, calib,
                                       fuse=a.fuse), indent=1))
    except CannotPrune as e:
        print(json.dumps({"tool": "onnxsim.pruning", "error": str(e)}, indent=1))


if __name__ == "__main__":
    main()
