"""Command-line entry points: the demo and the benchmarks that write docs/RESULTS.md.

    python -m tools.demo             the README's first command
    python -m tools.bench_accuracy   text models: accuracy / embedding fidelity vs FLOPs kept
    python -m tools.bench_vision     CNNs: accuracy / agreement (and latency) vs FLOPs kept
    python -m tools.bench_fusion     onnxruntime's attention fusion and latency after pruning
    python -m tools.bench_text       scorer speed, exact scoring, end to end, latency (MiniLM)
    python -m tools.competitors      onnx-simplifier's own pruning on one model

Each only says what it measures; the shared machinery (targets, runs, records, plots, RESULTS
blocks) is the :mod:`tools.bench` package, and the reference models come from :mod:`models`.
"""
