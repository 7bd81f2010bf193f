"""The one exception type the tool raises for bad input.

Every stage raises :class:`OptinError` with a single-line message that names the problem (the file,
the input, the value) so the CLI can print it without a traceback and exit non-zero.
"""
from __future__ import annotations


class OptinError(Exception):
    """A user-facing error: bad input, an impossible request, or a failed correctness check."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (onnxruntime's and onnx-ir's run to many),
    or its type's name when it has none."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]
