"""A zoo of tiny random-config transformers, exported the way a user's exporter writes them.

Issue 9: heads must be found in whatever attention an exporter writes, not only in the eager
BERT our other fixtures use. Every entry builds one architecture from a seeded random config (no
hub download) with transformers' *default* attention implementation (what ``from_pretrained``
gives a user today) or, on request, the eager one, wrapped to take keyword arguments and return
one tensor (a tuple for the KV-cache decoder). :func:`export` writes it with either torch.onnx
exporter (and BERT also through onnxruntime's fusion) with dynamic batch / sequence axes.
Everything is small (2 layers, hidden 64, 4 heads of 16, sequence 16) so that one export takes
seconds on a shared 2-core machine.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

Exporter = Literal["dynamo", "torchscript", "ort-fused"]
Attention = Literal["default", "eager"]

EXPORTERS: tuple[Exporter, ...] = ("torchscript", "dynamo")
#: Architectures also exported as "ort-fused": TorchScript, then onnxruntime's transformer
#: fusion for its ``bert`` model type (what many deployment pipelines run first).
ORT_FUSED = ("bert",)
SEQ = 16
BATCH = 2
VOCAB = 128
LAYERS = 2
HEADS = 4
HEAD_DIM = 16
HIDDEN = HEADS * HEAD_DIM
FFN = 96
IMAGE = 32
MAX_POSITIONS = 64
KV_HEADS = 2
MHA = (HEADS,) * LAYERS  # attention units per layer: multi-head attention
GQA = (KV_HEADS,) * LAYERS  # grouped-query attention: one unit per KV head


@dataclass
class ZooModel:
    """One architecture ready to export.

    ``dynamic``: input or output name -> {axis: symbolic name}; axes named alike share one
    ``torch.export.Dim``. ``units``: the attention units a correct analysis finds, per attention
    layer (the query heads; for grouped-query attention the KV heads, each with its query heads
    forming one unit). ``attn_impl``: ``config._attn_implementation`` as the model was built.
    """

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]
    output_names: list[str]
    units: tuple[int, ...]
    attn_impl: str

    def feeds(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``n`` calibration samples shaped like :attr:`inputs` (first axis = sample): token ids
        drawn like the export's, masks padded on the right in every other sample, images
        Gaussian. A KV cache is empty (axis "past" of length 0, "total" = the sequence), as a
        generation's first step sees it."""
        rng = np.random.default_rng(seed)
        out = {}
        sizes = {"past": 0, "total": SEQ}
        for name, t in self.inputs.items():
            shape = (n, *[sizes.get(self.dynamic.get(name, {}).get(a, ""), d)
                          for a, d in enumerate(t.shape) if a])
            if "mask" in name:
                a = np.ones(shape, np.int64)
                a[1::2, -(shape[-1] // 4):] = 0  # padding at the end of odd samples
            elif name == "token_type_ids":
                a = np.zeros(shape, np.int64)
            elif t.dtype == torch.int64:
                a = rng.integers(2, VOCAB, size=shape, dtype=np.int64)
            else:
                a = rng.standard_normal(shape).astype(np.float32)
            out[name] = a
        return out


class KeywordWrapper(nn.Module):
    """Calls a transformers model with keyword arguments (the TorchScript tracer breaks on
    positional calls in transformers 5) and returns one tensor: ``logits`` when the model has
    them, else ``last_hidden_state``. ``extra`` are constant keyword arguments (``use_cache``)."""

    def __init__(self, model: nn.Module, names: list[str], **extra):
        super().__init__()
        self.model = model
        self.names = names
        self.extra = extra
        self.eval()

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), **self.extra)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class CacheWrapper(nn.Module):
    """A decoder with its KV cache as graph inputs and outputs: ``past.{i}.key/value``
    [batch, kv_heads, past, head_dim] in, ``present.{i}.key/value`` out, the cache object that
    transformers 5 expects built from those tensors inside the graph."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers
        self.eval()

    def forward(self, *args):
        from transformers import DynamicCache

        input_ids, attention_mask, *past = args
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=cache, use_cache=True)
        present = out.past_key_values
        flat = [t for i in range(self.layers)
                for t in (present.layers[i].keys, present.layers[i].values)]
        return (out.last_hidden_state, *flat)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Wide random weights, random biases and norm scales: masking one unit then moves the outputs
    well above float32 noise, and no two parameters are equal (exporters de-duplicate equal
    constants, which would test sharing, not attention; ``tests/test_attention_forms.py`` covers
    that)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name.lower() or name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _text(token_types: bool = False) -> dict[str, torch.Tensor]:
    """Token inputs [BATCH, SEQ]: ids in [2, VOCAB) (RoBERTa's padding id 1 never occurs), the
    second row padded over its last quarter."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, -SEQ // 4:] = 0
    out = {"input_ids": torch.randint(2, VOCAB, (BATCH, SEQ), generator=g), "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.zeros(BATCH, SEQ, dtype=torch.int64)
    return out


def _build(cls: type, cfg, attention: Attention, seed: int, **kwargs) -> nn.Module:
    """``cls(cfg)`` with the default attention implementation, or eager when asked."""
    if attention == "eager":
        cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(cls(cfg, **kwargs), seed)


def _text_model(model: nn.Module, inputs: dict[str, torch.Tensor], units: tuple[int, ...] = MHA,
                **extra) -> ZooModel:
    names = list(inputs)
    return ZooModel(KeywordWrapper(model, names, **extra), inputs,
                    {n: {0: "batch", 1: "sequence"} for n in names}, ["output"], units,
                    model.config._attn_implementation)


def _vision_model(model: nn.Module, units: tuple[int, ...] = MHA) -> ZooModel:
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    return ZooModel(KeywordWrapper(model, ["pixel_values"]), {"pixel_values": x},
                    {"pixel_values": {0: "batch"}}, ["output"], units,
                    model.config._attn_implementation)


def _config(cls_name: str, **extra):
    """A transformers config by class name with the zoo's common sizes (the BERT-style keyword
    names most architectures share) and ``extra`` on top."""
    import transformers

    return getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS, **extra)


def bert(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import BertModel

    cfg = _config("BertConfig")
    return _text_model(_build(BertModel, cfg, attention, seed, add_pooling_layer=False),
                       _text(token_types=True))


def roberta(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import RobertaModel

    cfg = _config("RobertaConfig")
    return _text_model(_build(RobertaModel, cfg, attention, seed, add_pooling_layer=False), _text())


def distilbert(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                           hidden_dim=FFN, max_position_embeddings=MAX_POSITIONS)
    return _text_model(_build(DistilBertModel, cfg, attention, seed), _text())


def albert(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """ALBERT applies one layer's weights to every layer: 2 applications of 1 shared layer, after
    an embedding projection 32 -> 64. The analysis ties the applications: one attention block,
    pruned once, the weights staying shared."""
    from transformers import AlbertModel

    cfg = _config("AlbertConfig", embedding_size=32)
    return _text_model(_build(AlbertModel, cfg, attention, seed, add_pooling_layer=False),
                       _text(token_types=True), units=(HEADS,))


def electra(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import ElectraModel

    cfg = _config("ElectraConfig", embedding_size=32)
    return _text_model(_build(ElectraModel, cfg, attention, seed), _text(token_types=True))


def deberta_v2(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import DebertaV2Model

    cfg = _config("DebertaV2Config", relative_attention=True, position_buckets=8,
                  max_relative_positions=32, pos_att_type=["p2c", "c2p"], type_vocab_size=0)
    return _text_model(_build(DebertaV2Model, cfg, attention, seed), _text())


def mpnet(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import MPNetModel

    cfg = _config("MPNetConfig")
    return _text_model(_build(MPNetModel, cfg, attention, seed, add_pooling_layer=False), _text())


def modernbert(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """Layer 0 global attention, layer 1 local (sliding window of 8 over 16 tokens); fused Wqkv
    and a GeGLU MLP (fused Wi split in halves)."""
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=FFN,
                           max_position_embeddings=MAX_POSITIONS, global_attn_every_n_layers=2,
                           local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                           cls_token_id=1, sep_token_id=1)
    return _text_model(_build(ModernBertModel, cfg, attention, seed), _text())


def t5_encoder(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, num_heads=HEADS, d_ff=FFN,
                   num_layers=LAYERS, relative_attention_num_buckets=8,
                   relative_attention_max_distance=32)
    return _text_model(_build(T5EncoderModel, cfg, attention, seed), _text())


def gpt2(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                     n_positions=MAX_POSITIONS)
    return _text_model(_build(GPT2Model, cfg, attention, seed), _text(), use_cache=False)


def _decoder(family: str, attention: Attention, seed: int, **extra) -> ZooModel:
    """``{family}Model`` with grouped-query attention (4 query heads over 2 KV heads: 2 units of
    2 query heads), called without a cache (``use_cache=False``)."""
    import transformers

    cfg = _config(f"{family}Config", num_key_value_heads=KV_HEADS, **extra)
    model = _build(getattr(transformers, f"{family}Model"), cfg, attention, seed)
    return _text_model(model, _text(), units=GQA, use_cache=False)


def llama(attention: Attention = "default", seed: int = 0) -> ZooModel:
    return _decoder("Llama", attention, seed)


def qwen2(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """With Q/K/V biases."""
    return _decoder("Qwen2", attention, seed)


def mistral(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """With a sliding window of 8 over 16 tokens."""
    return _decoder("Mistral", attention, seed, sliding_window=8)


def phi3(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """Fused qkv_proj and fused gate_up_proj."""
    return _decoder("Phi3", attention, seed, pad_token_id=0)


def llama_cache(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """Llama (GQA 4 over 2) with its KV cache as graph inputs and outputs: exported with a past
    of length 4, ``attention_mask`` covering past + sequence (axis "total")."""
    from transformers import LlamaModel

    cfg = _config("LlamaConfig", num_key_value_heads=KV_HEADS)
    model = _build(LlamaModel, cfg, attention, seed)
    past_len, kv = 4, cfg.num_key_value_heads
    inputs = _text()
    inputs["attention_mask"] = torch.ones(BATCH, past_len + SEQ, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    dynamic: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                          "attention_mask": {0: "batch", 1: "total"}}
    outputs = ["output"]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs[f"past.{i}.{kind}"] = torch.randn(BATCH, kv, past_len, HEAD_DIM, generator=g)
            dynamic[f"past.{i}.{kind}"] = {0: "batch", 2: "past"}
            outputs.append(f"present.{i}.{kind}")
    return ZooModel(CacheWrapper(model, LAYERS), inputs, dynamic, outputs, GQA,
                    model.config._attn_implementation)


def vit(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=FFN)
    return _vision_model(_build(ViTModel, cfg, attention, seed, add_pooling_layer=False))


def deit(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import DeiTConfig, DeiTForImageClassification

    cfg = DeiTConfig(image_size=IMAGE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN, num_labels=5)
    return _vision_model(_build(DeiTForImageClassification, cfg, attention, seed))


def dinov2(attention: Attention = "default", seed: int = 0) -> ZooModel:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(image_size=IMAGE, patch_size=8, hidden_size=HIDDEN,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, mlp_ratio=2)
    return _vision_model(_build(Dinov2Model, cfg, attention, seed))


def swin(attention: Attention = "default", seed: int = 0) -> ZooModel:
    """Two stages of one block each (window 4 over an 8x8 patch grid, then patch merging to 4x4),
    2 then 4 heads of 16. Its forward mutates the module under TorchScript tracing
    (``set_shift_and_window_size``): export a fresh model each time."""
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=32, depths=[1, 1],
                     num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
    return _vision_model(_build(SwinModel, cfg, attention, seed, add_pooling_layer=False),
                         units=(2, 4))


#: name -> builder(attention, seed). Order: encoders, decoders, vision.
ZOO: dict[str, Callable[..., ZooModel]] = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "albert": albert,
    "electra": electra, "deberta-v2": deberta_v2, "mpnet": mpnet, "modernbert": modernbert,
    "t5-encoder": t5_encoder, "gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral,
    "phi3": phi3, "llama-cache": llama_cache, "vit": vit, "deit": deit, "dinov2": dinov2,
    "swin": swin,
}


def ort_fuse(path: Path, heads: int = HEADS, hidden: int = HIDDEN) -> Path:
    """Rewrite ``path`` with onnxruntime's BERT fusion (its Python fusions only, opt_level 0):
    SkipLayerNormalization, BiasGelu and, where it recognises the pattern, ``com.microsoft``
    Attention with packed QKV weights. Saved through the optimizer, which declares the
    ``com.microsoft`` opset (its in-memory ``.model`` does not)."""
    import logging

    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads,
                                   hidden_size=hidden, opt_level=0, use_gpu=False)
    opt.save_model_to_file(str(path))
    return path


def export(zm: ZooModel, path: str | Path, exporter: Exporter = "torchscript",
           opset: int = 17) -> Path:
    """Export ``zm`` with its dynamic axes: TorchScript (``dynamo=False``) with named
    ``dynamic_axes``, or dynamo with one ``torch.export.Dim`` per axis name (opset >= 18, the
    lowest torchlib writes); "ort-fused": TorchScript, then :func:`ort_fuse`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "ort-fused":
        return ort_fuse(export(zm, path, "torchscript", opset))
    names = list(zm.inputs)
    args = tuple(zm.inputs.values())
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(zm.module, args, str(path), input_names=names,
                              output_names=zm.output_names, dynamic_axes=zm.dynamic,
                              opset_version=opset, dynamo=False)
        else:
            dims: dict[str, torch.export.Dim] = {}
            # Token axes are bounded by the position tables (MAX_POSITIONS): torch.export proves
            # the range or refuses. One spec per positional argument, under the wrappers' *args.
            shapes = tuple({a: dims.setdefault(d, torch.export.Dim(
                d, max=512 if d == "batch" else MAX_POSITIONS))
                for a, d in zm.dynamic.get(n, {}).items()} for n in names)
            prog = torch.onnx.export(zm.module, args, input_names=names,
                                     output_names=zm.output_names, dynamic_shapes=(shapes,),
                                     opset_version=max(opset, 18), dynamo=True,
                                     verbose=False)
            prog.save(str(path))
    return path
