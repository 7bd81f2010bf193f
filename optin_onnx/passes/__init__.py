"""Graph rewrites that prepare a model for the analysis or tidy a pruned one, one pass per module
(in the style of onnx-ir's own passes): each takes an ``ir.Model``, edits it in place and says
what it changed.

- :mod:`~optin_onnx.passes.unfuse_projections`: one MatMul split into Q/K/V becomes three MatMuls.
- :mod:`~optin_onnx.passes.canonicalize_reshapes`: run-time Reshape targets become constants.
"""
