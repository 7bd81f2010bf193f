"""What every benchmark command shares: its options, and writing a run out (JSON record, plot,
docs/RESULTS.md block), merged into the earlier record with ``--merge``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from tools.bench.methods import Settings
from tools.bench.plots import plot
from tools.bench.records import merge_record, write
from tools.bench.results import plotted


def floats(s: str) -> list[float]:
    """A comma-separated list of numbers (``0.9,0.8``)."""
    return [float(x) for x in s.split(",")]


def parser(prog: str, doc: str, methods: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options of a levels x methods benchmark; the tool adds its target and its own."""
    from optin_onnx.options import Teacher

    d = Settings()
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--levels", type=floats, default=list(d.levels))
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(methods))
    p.add_argument("--neuron-group", type=int, default=d.neuron_group,
                   help="units scored in proxy-ordered groups of N (1 = exact)")
    p.add_argument("--flops-per-round", dest="round_step", type=float, default=d.round_step,
                   help="optin/optin+ls/local: prune in rounds, each removing this fraction of the "
                        "FLOPs, re-scoring after each (optin_onnx.iterate; one chain of rounds "
                        "serves every level); 0 = one shot")
    # The earlier spelling, still accepted (recorded commands use it), not listed.
    p.add_argument("--round-step", dest="round_step", type=float, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--round-teacher", choices=get_args(Teacher), default=d.round_teacher,
                   help="with --flops-per-round: later rounds' teacher (ScoreConfig.teacher)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--merge", action="store_true",
                   help="add these rows to the existing record instead of replacing it")
    return p


def check_methods(p: argparse.ArgumentParser, methods: list[str], known: tuple[str, ...]) -> None:
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods: {', '.join(unknown)} (choose from {', '.join(known)})")


def finish(record: dict, argv: list[str] | None, prog: str, out: str, stem: str, merge: bool,
           tables: tuple[str, ...], block: Callable[[dict, Path], None],
           headline: tuple[str, str, float], defaults: tuple[str, ...] = (),
           legend_beside: bool = False) -> dict:
    """Stamp ``record`` with the command that made it, merge it into ``<out>/<stem>.json`` with
    ``merge`` (``tables`` and ``defaults`` as :func:`~tools.bench.records.merge_record`), write
    it, plot ``headline`` (metric key, axis label, scale) where there is a curve (legend beside
    the axes with ``legend_beside``), and rewrite its block of ``<out>/../RESULTS.md`` with
    ``block(record, results)``. Returns what was written."""
    record["command"] = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    folder = Path(out)
    path = folder / f"{stem}.json"
    if merge:
        record = merge_record(path, record, tables, defaults)
    write(record, path)
    if plotted(record):
        key, label, scale = headline
        plot(record, folder / f"{stem}.png", key, label, scale, legend_beside)
    block(record, folder.parent / "RESULTS.md")
    return record
