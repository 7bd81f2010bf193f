"""The benchmark engine behind ``python -m tools.bench_*``: one module per job.

    targets    registry of reference models and their data (text and vision), by name
    prepare    what every method of a run shares: model, analysis, calibration, MAC model
    runner     batched onnxruntime inference over a dict of arrays
    metrics    accuracy / agreement / top-5 / KL against the dense model; embedding fidelity
    methods    importance per method (optin, optin+ls, local, magnitude, random), one shot or
               in rounds, shared across the methods of a run
    onnxsim    onnx-simplifier's own pruning swept to the same measured FLOPs (tools.competitors)
    run        levels x methods: select, rewrite, evaluate, one row per level
    records    JSON records: merging a run into an earlier one
    plots      one curve per method against the FLOPs kept
    results    the generated blocks of docs/RESULTS.md (tables and their intros)
    cli        the options and the write-out every benchmark command shares

The entry points in ``tools/`` only say what they measure (their options, the record's header, how
rows are named); this package does the rest, after Torch-Pruning's ``reproduce/`` (an engine plus
a registry).
"""
