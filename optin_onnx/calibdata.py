"""Build calibration ``.npz`` files from raw text.

Pruning scores are computed from activations on a small calibration batch, so the tool needs the
exact integer inputs the exported encoder expects. This module turns text into those arrays with the
model's own ``tokenizer.json`` (the fast ``tokenizers`` library, no torch or transformers), so any
Hugging Face tokenizer directory works and the core package stays light.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from optin_onnx.errors import OptinError
from optin_onnx.guard import write_atomically

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


def _pad_settings(tok: Any, tokenizer_dir: Path) -> tuple[int, int, str, str]:
    """Pad id, pad type id, pad token and side, from tokenizer.json's own padding config, else the
    ``pad_token`` of tokenizer_config.json / special_tokens_map.json, else ``[PAD]``.

    The id must be the model's real pad id: a wrong id changes nothing under the attention mask in
    theory, but some exports read ``input_ids`` for more than embeddings (e.g. position ids).
    """
    existing = tok.padding
    if existing and existing.get("pad_token") is not None:
        return (int(existing["pad_id"]), int(existing.get("pad_type_id", 0)),
                str(existing["pad_token"]), existing.get("direction", "right"))
    token = "[PAD]"
    for name in TOKENIZER_FILES[1:]:
        cfg = tokenizer_dir / name
        if cfg.is_file():
            try:
                value = json.loads(cfg.read_text(encoding="utf-8")).get("pad_token")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, dict):  # AddedToken serialisation: {"content": "[PAD]", ...}
                value = value.get("content")
            if isinstance(value, str):
                token = value
                break
    pad_id = tok.token_to_id(token)
    if pad_id is None:
        raise OptinError(f"tokenizer in {tokenizer_dir} has no pad token {token!r}")
    return int(pad_id), 0, token, "right"


def encode_texts(texts: Sequence[str], tokenizer_dir: str | Path, max_length: int = 128,
                 input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` into int64 ``[N, S]`` arrays for a BERT-style encoder.

    Sequences are truncated at ``max_length`` (encoders have a position-embedding limit and long
    calibration rows only cost time) and padded to the longest row in the batch, not to a fixed
    length, so ``S`` is as short as the data allows. ``attention_mask`` is 0 exactly at padding.

    ``input_names`` (e.g. the model's graph inputs) selects and orders the returned arrays; a name
    that cannot be produced from text raises :class:`OptinError` rather than silently feeding the
    model something made up.
    """
    if max_length < 2:
        raise OptinError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
    texts = list(texts)
    if not texts:
        raise OptinError("no texts to encode")
    if not all(isinstance(t, str) for t in texts):
        raise OptinError("every text must be a string")
    wanted = list(PRODUCIBLE) if input_names is None else list(input_names)
    unknown = [n for n in wanted if n not in PRODUCIBLE]
    if unknown:
        raise OptinError(f"cannot build input {unknown[0]!r} from text "
                         f"(can build: {', '.join(PRODUCIBLE)})")

    tokenizer_dir = Path(tokenizer_dir)
    tok = _load_tokenizer(tokenizer_dir)
    pad_id, pad_type_id, pad_token, direction = _pad_settings(tok, tokenizer_dir)
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
    return {n: arrays[n] for n in wanted}


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
