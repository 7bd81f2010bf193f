"""optin-onnx: retraining-free structured pruning of exported ONNX models."""
from optin_onnx.errors import OptinError

__all__ = ["OptinError"]
