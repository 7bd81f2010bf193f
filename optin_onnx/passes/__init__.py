"""Graph rewrites that prepare a model for the analysis or tidy a pruned one, one pass per module
(in the style of onnx-ir's own passes): each takes an ``ir.Model``, edits it in place and says
what it changed.

- :mod:`~optin_onnx.passes.unfuse_projections`: one MatMul (or Gemm) whose output channels are cut
  into Q/K/V or gate/up becomes one MatMul per part (Split, Slices, a bias or a Reshape between).
- :mod:`~optin_onnx.passes.fold_slice_bounds`: Slice bounds computed from a static width
  (TorchScript's ``torch.chunk``) become constants; run by ``unfuse_projections`` first.
- :mod:`~optin_onnx.passes.canonicalize_reshapes`: run-time Reshape targets become constants.
"""
