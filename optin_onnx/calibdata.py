"""Build calibration ``.npz`` files from raw text.

Pruning scores are computed from activations on a small calibration batch, so the tool needs the
exact integer inputs the exported encoder or decoder expects. This module turns text into those
arrays with the model's own ``tokenizer.json`` (the fast ``tokenizers`` library, no torch or
transformers), so any Hugging Face tokenizer directory works and the core package stays light.
Given the model, it writes exactly its inputs: position ids and an empty key/value cache too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from optin_onnx.errors import OptinError
from optin_onnx.guard import write_atomically
from optin_onnx.io.calibration import cache_inputs, empty_past, graph_input_names

#: The files of a tokenizer folder this module reads: tokenizer.json, then the pad-token configs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: The arrays :func:`encode_texts` can produce, in the order BERT-style exports declare them.
PRODUCIBLE = ("input_ids", "attention_mask", "token_type_ids")


def _load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """Import ``tokenizers`` only here: it is an optional extra, and the pruning core never needs it."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptinError("building calibration data from text needs the 'tokenizers' package: "
                         "pip install optin-onnx[text]") from None
    path = Path(tokenizer_dir) / TOKENIZER_FILES[0]
    if not path.is_file():
        raise OptinError(f"no tokenizer.json in {tokenizer_dir}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptinError(f"cannot load {path}: {msg}") from None


def _config_token(tokenizer_dir: Path, key: str) -> str | None:
    """The special token ``key`` (``pad_token``, ``eos_token``) as tokenizer_config.json, else
    special_tokens_map.json, declares it; None where neither does."""
    for name in TOKENIZER_FILES[1:]:
        cfg = tokenizer_dir / name
        if cfg.is_file():
            try:
                value = json.loads(cfg.read_text(encoding="utf-8")).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, dict):  # AddedToken serialisation: {"content": "[PAD]", ...}
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _pad_settings(tok: Any, tokenizer_dir: Path) -> tuple[int, int, str, str, str | None]:
    """Pad id, pad type id, pad token, side and a note, from tokenizer.json's own padding config,
    else the ``pad_token`` of tokenizer_config.json / special_tokens_map.json, else ``[PAD]``,
    else (decoder tokenizers such as GPT-2's and Llama's have no pad token) the ``eos_token``,
    with a note saying so; the note is None otherwise.

    The id must be the model's real pad id where it has one: a wrong id changes nothing under the
    attention mask in theory, but some exports read ``input_ids`` for more than embeddings (e.g.
    position ids). A decoder without one never sees padding in training, and any id serves as
    long as the mask hides it; eos is what transformers' own generation pads with then.
    """
    existing = tok.padding
    if existing and existing.get("pad_token") is not None:
        return (int(existing["pad_id"]), int(existing.get("pad_type_id", 0)),
                str(existing["pad_token"]), existing.get("direction", "right"), None)
    declared = _config_token(tokenizer_dir, "pad_token")
    token = declared or "[PAD]"
    pad_id = tok.token_to_id(token)
    note = None
    if pad_id is None and declared is None:
        eos = _config_token(tokenizer_dir, "eos_token")
        pad_id = tok.token_to_id(eos) if eos is not None else None
        if pad_id is not None:
            token = eos
            note = (f"the tokenizer has no pad token: padding with its eos token {eos!r} "
                    f"(id {pad_id}), masked out by attention_mask")
    if pad_id is None:
        raise OptinError(f"tokenizer in {tokenizer_dir} has no pad token {token!r}"
                         + ("" if declared else " and no eos_token to pad with"))
    return int(pad_id), 0, token, "right", note


def tokenize(texts: Sequence[str], tokenizer_dir: str | Path,
              max_length: int) -> tuple[dict[str, np.ndarray], str | None]:
    """The :data:`PRODUCIBLE` int64 ``[N, S]`` arrays for ``texts``, and the note to print where
    the tokenizer had no pad token and eos pads instead (:func:`_pad_settings`), else None.

    Sequences are truncated at ``max_length`` (models have a position limit and long calibration
    rows only cost time) and padded to the longest row in the batch, not to a fixed length, so
    ``S`` is as short as the data allows. ``attention_mask`` is 0 exactly at padding.
    """
    if max_length < 2:
        raise OptinError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
    texts = list(texts)
    if not texts:
        raise OptinError("no texts to encode")
    if not all(isinstance(t, str) for t in texts):
        raise OptinError("every text must be a string")
    tokenizer_dir = Path(tokenizer_dir)
    tok = _load_tokenizer(tokenizer_dir)
    pad_id, pad_type_id, pad_token, direction, note = _pad_settings(tok, tokenizer_dir)
    # Override whatever the file ships with (all-MiniLM's tokenizer.json pads to a fixed 128).
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_type_id=pad_type_id, pad_token=pad_token,
                       direction=direction, length=None)
    encodings = tok.encode_batch(texts)
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    return arrays, note


def encode_texts(texts: Sequence[str], tokenizer_dir: str | Path, max_length: int = 128,
                 input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` into int64 ``[N, S]`` arrays for a BERT-style encoder (see
    :func:`tokenize` for truncation and padding).

    ``input_names`` (e.g. the model's graph inputs) selects and orders the returned arrays; a name
    that cannot be produced from text raises :class:`OptinError` rather than silently feeding the
    model something made up. :func:`encode_for_model` reads the names, types and cache inputs
    from the model itself.
    """
    wanted = list(PRODUCIBLE) if input_names is None else list(input_names)
    unknown = [n for n in wanted if n not in PRODUCIBLE]
    if unknown:
        raise OptinError(f"cannot build input {unknown[0]!r} from text "
                         f"(can build: {', '.join(PRODUCIBLE)})")
    arrays, _ = tokenize(texts, tokenizer_dir, max_length)
    return {n: arrays[n] for n in wanted}


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counting real tokens only: ``attention_mask.cumsum(-1) - 1`` clipped at 0, as
    transformers computes them for its decoders, so left padding does not shift the positions
    of the text (right padding gives ``0 .. len-1``; masked positions keep a valid index)."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)


def encode_for_model(texts: Sequence[str], tokenizer_dir: str | Path, model: ir.Model,
                     max_length: int = 128) -> tuple[dict[str, np.ndarray], list[str]]:
    """Exactly ``model``'s graph inputs from ``texts``, in its order and declared dtypes, and the
    notes worth printing (the pad-token fallback).

    Encoders and decoders alike: ``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``position_ids`` (:func:`position_ids`) and, for a decoder exported with its key/value cache,
    an empty past (:func:`~optin_onnx.io.calibration.empty_past`), as the first step of a
    generation sees it. Any other input is refused by name: making it up would calibrate on
    data the model never sees.
    """
    names = graph_input_names(model)
    cache = cache_inputs(model)
    buildable = (*PRODUCIBLE, "position_ids")
    unknown = [n for n in names if n not in buildable and n not in cache]
    if unknown:
        raise OptinError(f"cannot build graph input {unknown[0]!r} from text (can build: "
                         f"{', '.join(buildable)} and an empty key/value cache)")
    tokens, note = tokenize(texts, tokenizer_dir, max_length)
    tokens["position_ids"] = position_ids(tokens["attention_mask"])
    past = empty_past(model, len(tokens["input_ids"])) if cache else {}
    declared = {value.name: value.dtype for value in model.graph.inputs}
    arrays = {}
    for name in names:
        if name in past:
            arrays[name] = past[name]
        else:
            dtype = declared[name]
            arrays[name] = tokens[name] if dtype is None else tokens[name].astype(dtype.numpy())
    return arrays, [note] if note else []


def write_calibration(arrays: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Save ``arrays`` with :func:`numpy.savez`, atomically.

    The file is written next to the target and moved into place (:func:`write_atomically`), so an
    interrupted run never leaves a truncated ``.npz`` that a later pruning run would trust.
    Missing parent folders are created.
    """
    if not arrays:
        raise OptinError("no arrays to write")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptinError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    # A file object: savez would append .npz to a str name.
    write_atomically(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))
    return path


def read_texts(path: str | Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file (surrounding whitespace stripped).

    Line-per-text is the simplest format any corpus can be dumped to; blank lines are skipped so a
    trailing newline or paragraph spacing does not create empty calibration rows.
    """
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise OptinError(f"text file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise OptinError(f"{path} is not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise OptinError(f"cannot read {path}: {e.strerror}") from None
    return [line.strip() for line in content.splitlines() if line.strip()]
