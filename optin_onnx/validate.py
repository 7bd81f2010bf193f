"""Every pruning option checked up front, with the CLI flag's name in a one-line error.

Without this, a bad value surfaces minutes later as a traceback from numpy or the search (a
negative seed, ``prune="all"``), or passes silently: ``--lam nan`` turns every score into NaN and
NaN compares as "not worse", ``--tolerance nan`` accepts any difference, and 0 or a negative
count becomes an empty slice. The Python API gets the same checks, so a string where a number
belongs (``flops="0.6"``) is refused too.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from optin_onnx.errors import OptinError
from optin_onnx.scoring.importance import IMPORTANCES

#: The values each choice option accepts (the CLI's ``choices`` come from here too).
CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(IMPORTANCES),
    "prune": ("heads", "neurons", "both"),
    "feature_kind": ("auto", "ffn", "residual-ln", "blocks"),
    "round_teacher": ("dense", "current"),
    "simplify": ("auto", "on", "off"),
}

#: Numeric options: field -> (flag, integer?, smallest value, whether that value itself is allowed).
NUMBERS: dict[str, tuple[str, bool, float, bool]] = {
    "seq_len": ("--seq-len", True, 1, True),
    "samples": ("--samples", True, 1, True),
    "lam": ("--lam", False, 0.0, True),
    "seed": ("--seed", True, 0, True),
    "tokens": ("--tokens", True, 1, True),
    "width_multiple": ("--round", True, 1, True),
    "channel_multiple": ("--channel-multiple", True, 1, True),
    "neuron_group": ("--neuron-group", True, 1, True),
    "steps": ("--steps", True, 1, True),
    "tolerance": ("--tolerance", False, 0.0, True),
    "latency_seconds": ("--latency-seconds", False, 0.0, False),
    "candidates_per_run": ("candidates_per_run", True, 1, True),
    "chunk_size": ("chunk_size", True, 1, True),
    "max_calib_bytes": ("--max-calib-gib", True, 1, True),
}

#: Options that may be ``None`` (chosen from the data).
OPTIONAL = frozenset({"seq_len"})

FLAGS = {"feature_kind": "--feature", "round_teacher": "--round-teacher"}


def check_number(flag: str, value: Any, integer: bool, lowest: float, inclusive: bool) -> None:
    """Raise unless ``value`` is a finite number (an integer if ``integer``) from ``lowest`` up
    (above it if not ``inclusive``). ``bool`` is not a number here, though Python says it is."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        noun = "an integer" if integer else "a number"
        raise OptinError(f"{flag} must be {noun}, got {value!r}")
    if not math.isfinite(value):
        raise OptinError(f"{flag} must be finite, got {value}")
    if value < lowest or (value == lowest and not inclusive):
        bound = f"at least {lowest:g}" if inclusive else f"above {lowest:g}"
        raise OptinError(f"{flag} must be {bound}, got {value}")


def check_options(opt: Any) -> None:
    """Check every field of a ``PruneOptions`` (see the module doc for why up front)."""
    flops = opt.flops
    if isinstance(flops, bool) or not isinstance(flops, numbers.Real) or not 0.0 < flops <= 1.0:
        raise OptinError(f"--flops must be in (0, 1], got {flops!r}")
    for field, (flag, integer, lowest, inclusive) in NUMBERS.items():
        value = getattr(opt, field)
        if value is None and field in OPTIONAL:
            continue
        check_number(flag, value, integer, lowest, inclusive)
    for field, allowed in CHOICES.items():
        value = getattr(opt, field)
        if value not in allowed:
            flag = FLAGS.get(field, "--" + field.replace("_", "-"))
            raise OptinError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    for field in ("allow_block_removal", "reconstruct", "canonicalize"):
        if not isinstance(getattr(opt, field), bool):
            raise OptinError(f"{field} must be True or False, got {getattr(opt, field)!r}")
    try:
        cases = [tuple(case) for case in opt.latency_cases]
    except TypeError:
        raise OptinError(f"--latency must be (batch, sequence) pairs, got {opt.latency_cases!r}") \
            from None
    for case in cases:
        if len(case) != 2:
            raise OptinError(f"--latency must be (batch, sequence) pairs, got {case!r}")
        check_number("--latency batch size", case[0], True, 1, True)
        if case[1] is not None:  # None or 0: a model without a sequence axis
            check_number("--latency sequence length", case[1], True, 0, True)
