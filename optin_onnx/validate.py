"""Every pruning option checked up front, with the CLI flag's name in a one-line error.

Without this, a bad value surfaces minutes later as a traceback from numpy or the search (a
negative seed, ``prune="all"``), or passes silently: ``--lam nan`` turns every score into NaN and
NaN compares as "not worse", ``--tolerance nan`` accepts any difference, and 0 or a negative
count becomes an empty slice. The Python API gets the same checks, so a string where a number
belongs (``flops="0.6"``) is refused too. What each option accepts is stated once, on its field
(:mod:`optin_onnx.options`); this module applies it.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, get_args

from optin_onnx.errors import OptinError
from optin_onnx.scoring.importance import IMPORTANCES

if TYPE_CHECKING:
    from optin_onnx.options import Spec


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


def check_flops(value: Any) -> None:
    """``--flops``: a fraction of the MACs, in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise OptinError(f"--flops must be in (0, 1], got {value!r}")


def check_latency_cases(value: Any) -> None:
    """``(batch, sequence)`` pairs; a sequence of 0 or None is a model without a sequence axis."""
    try:
        cases = [tuple(case) for case in value]
    except TypeError:
        raise OptinError(f"--latency must be (batch, sequence) pairs, got {value!r}") from None
    for case in cases:
        if len(case) != 2:
            raise OptinError(f"--latency must be (batch, sequence) pairs, got {case!r}")
        check_number("--latency batch size", case[0], True, 1, True)
        if case[1] is not None:
            check_number("--latency sequence length", case[1], True, 0, True)


def check_output_names(value: Any) -> None:
    """``--objective-output``: None (every output a pruned block can change) or a non-empty list
    of names. A bare string is refused rather than read as one name: ``"a,b"`` would silently
    become one output named ``a,b``. Whether each name is an output of the model is checked once
    the model is loaded (:func:`optin_onnx.scoring.features.objective_outputs`)."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(name, str) and name for name in value):
        raise OptinError(f"--objective-output must be a non-empty list of output names, "
                         f"got {value!r}")


def check_options(opt: Any, specs: Mapping[str, tuple[Spec, Any]],
                  choices: Mapping[str, tuple[str, ...]]) -> None:
    """Check every field of ``opt`` against its spec (``specs``: {field: (spec, type)}, as
    :func:`optin_onnx.options.specs` gives), then the rules that tie fields together."""
    for name, (spec, kind) in specs.items():
        value = getattr(opt, name)
        if spec.check is not None:
            spec.check(value)
        elif name in choices:
            if value not in choices[name]:
                raise OptinError(f"{spec.flag} must be one of {', '.join(choices[name])}, "
                                 f"got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise OptinError(f"{name} must be True or False, got {value!r}")
        elif spec.lowest is not None:
            if value is None and type(None) in get_args(kind):
                continue  # chosen from the data
            integer = int in (kind, *get_args(kind))
            check_number(spec.flag, value, integer, spec.lowest, spec.inclusive)
    if opt.steps > 1 and not IMPORTANCES[opt.method].rescores:
        raise OptinError(f"--rounds {opt.steps} re-scores between rounds; {opt.method} scores do "
                         f"not depend on what is pruned, so use --rounds 1 with it")
