"""optin-onnx: retraining-free structured pruning of exported ONNX models.

One function does the whole job (:func:`prune`): the four stages of :mod:`optin_onnx.stages`
(``prepare``, ``select``, ``build``, ``check``), each importable on its own, as is every step
inside them: ``analysis.analyze_graph``, ``flops.mac_model``, ``calibrate.make_calibration``,
``scoring.trajectory.score_fast``, ``search.search``, ``rewrite.rewrite``, ``simplify.simplify``,
``verify.verify``, ``report.render``. Options: :class:`PruneOptions` (:mod:`optin_onnx.options`).
"""
from optin_onnx.errors import OptinError
from optin_onnx.pipeline import PruneOptions, PruneResult, analyze, prune
from optin_onnx.report import Report, print_report, render

__all__ = ["OptinError", "PruneOptions", "PruneResult", "Report", "analyze", "print_report",
           "prune", "render"]
