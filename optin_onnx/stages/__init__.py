"""The stages of a prune, in order, each a plain function over the record the one before made:

    prepare.prepare  load, analyse, calibrate, count                     -> Prepared
    select.select    score and search, in rounds                         -> Selection
    build.build      reconstruct, rewrite, canonicalize, simplify        -> Built
    check.check      verify, fidelity, latency (check.make_report: the report) -> Checked

:func:`optin_onnx.prune` runs them in that order; the benchmarks call them one by one. Import
them from their modules (``from optin_onnx.stages.prepare import prepare``): a function here of
the same name as its module would hide the module.
"""
