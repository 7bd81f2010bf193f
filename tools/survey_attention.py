"""Survey: for each architecture of the zoo and each exporter, are heads and neurons found, and
why not (issue 9).

    python -m tools.survey_attention [--arch bert,llama] [--exporter dynamo] [--no-prune]
                                     [--output docs/survey_attention.md]

Every form (architecture x exporter x attention implementation: transformers' default, and eager
where the default differs; exporters: torchscript, dynamo, and "ort-fused", TorchScript then
onnxruntime's BERT fusion, for BERT) is exported to a temporary directory and analysed as ``optin-onnx
analyze`` does (fused projections split, probed at the calibration data's shapes); where blocks
are found it is pruned to 0.7 of its MACs (8 scoring samples, no latency timing) and verified.
One markdown row per form; with ``--output`` the table is written there, with the command.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from models import zoo

#: Calibration samples given to ``prune``: 8 score, the rest are held out for fidelity.
CALIB_SAMPLES = 12

COLUMNS = ("arch", "exporter", "attention", "export", "attention blocks", "mlp blocks",
           "declined", "head groups not declined", "MACs outside", "prune 0.7")


@dataclass(frozen=True)
class Form:
    """One export of one architecture: ``attention`` is "default" or "eager"."""

    arch: str
    exporter: str
    attention: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.exporter}-{self.attention}"


@dataclass
class Outcome:
    """What the analysis and the pipeline made of one form; ``None`` fields were not reached."""

    form: Form
    attn_impl: str = ""
    export_error: str | None = None
    attention: list[tuple[int, int]] = field(default_factory=list)  # (units, unit size) per block
    mlp: list[int] = field(default_factory=list)  # neurons per block
    declined: list[str] = field(default_factory=list)  # every reason of every declined group
    # every barrier of every group with a head axis that is neither a block nor declined, and
    # where each such group is listed ("model width" or "nowhere")
    dropped: list[str] = field(default_factory=list)
    dropped_where: list[str] = field(default_factory=list)
    outside: float | None = None  # fraction of the MACs outside every block
    analysis_error: str | None = None
    prune: str | None = None

    def row(self) -> str:
        """The form as one markdown table row (columns: :data:`COLUMNS`)."""
        def blocks(items: list) -> str:
            counts = Counter(items)
            return ", ".join(f"{n} x {k}" for k, n in counts.items()) or "-"

        if self.export_error:
            cells = ["fails: " + _cell(self.export_error)] + ["-"] * 6
        elif self.analysis_error:
            cells = ["ok", "analysis fails: " + _cell(self.analysis_error)] + ["-"] * 5
        else:
            heads = blocks([f"{u} heads of {d}" for u, d in self.attention])
            where = ", ".join(f"{n} as {w}" for w, n in Counter(self.dropped_where).items())
            dropped = f"{where}: {_reasons(self.dropped)}" if self.dropped_where else "-"
            cells = ["ok", heads, blocks([f"{n}" for n in self.mlp]),
                     _reasons(self.declined) or "-", dropped, f"{self.outside:.1%}",
                     _cell(self.prune or "-")]
        cells = [self.form.arch, self.form.exporter, self.attn_impl, *cells]
        return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "/")


def _reasons(reasons: list[str]) -> str:
    """Distinct reasons without node names, each with its count when it recurs."""
    return _cell("; ".join(f"{n}x {r}" if n > 1 else r
                           for r, n in Counter(map(shorten, reasons)).items()))


def shorten(reason: str) -> str:
    """A declined reason without its node names, so that the same cause reads the same in every
    layer and exporter (``no handler for op Expand``)."""
    reason = re.sub(r" \('[^']*'\)", "", reason)
    return re.sub(r" '[^']*'", "", reason)


def first_line(exc: BaseException) -> str:
    """The innermost cause's type and first line: torch.onnx wraps the real failure in a
    several-paragraph error about which export step failed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def forms(archs: list[str], exporters: list[str]) -> list[Form]:
    """Every form of ``archs``: the default attention, and eager where the default is not eager
    (building a model is milliseconds; its config says which implementation it got)."""
    out = []
    for arch in archs:
        default = zoo.ZOO[arch]("default").attn_impl
        for exporter in exporters:
            if exporter == "ort-fused" and arch not in zoo.ORT_FUSED:
                continue
            out += [Form(arch, exporter, "default")]
            if default != "eager":
                out += [Form(arch, exporter, "eager")]
    return out


def survey(form: Form, root: Path, prune: bool = True) -> Outcome:
    """Export, analyse and (where blocks are found and ``prune``) prune ``form``; failures are
    findings and are recorded, not raised."""
    from optin_onnx.flops import mac_model
    from optin_onnx.pipeline import prune as run_prune
    from tools.attention_pattern import analyse, fates

    zm = zoo.ZOO[form.arch](form.attention)
    out = Outcome(form, attn_impl=zm.attn_impl)
    path = root / f"{form.id}.onnx"
    try:
        zoo.export(zm, path, form.exporter)
    except Exception as exc:  # noqa: BLE001 - a torch export failure is a finding
        out.export_error = first_line(exc)
        return out
    feeds = zm.feeds(CALIB_SAMPLES)
    try:
        model, values, structure = analyse(path, feeds)
        macs = mac_model(model, structure, zoo.SEQ, like=feeds)
        silent = [(verdict, g) for verdict, g in fates(model, values, structure)
                  if verdict.startswith("DROPPED")]
    except Exception as exc:  # noqa: BLE001
        out.analysis_error = first_line(exc)
        return out
    out.attention = [(b.n_units, b.unit_size) for b in structure.blocks if b.kind == "attention"]
    out.mlp = [b.n_units for b in structure.blocks if b.kind == "mlp"]
    out.declined = [r for d in structure.declined for r in d.reasons]
    out.dropped = [r for _, g in silent for r in dict.fromkeys(g.barriers)]
    out.dropped_where = ["model width" if "model width" in v else "nowhere" for v, _ in silent]
    out.outside = macs.base / macs.total
    if prune and structure.blocks:
        try:
            res = run_prune(path, feeds, flops=0.7, latency_cases=[], samples=8)
            cut = Counter()
            for b in res.structure.blocks:
                cut[b.kind] += b.n_units - len(res.selection.keep[b.name])
            out.prune = (f"verified ({res.verification.max_abs_err:.0e}); cut "
                         f"{cut['attention']} heads, {cut['mlp']} neurons")
        except Exception as exc:  # noqa: BLE001
            out.prune = "fails: " + first_line(exc)
    return out


HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"


def table(outcomes: list[Outcome]) -> str:
    return HEADER + "".join(o.row() + "\n" for o in outcomes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=",".join(zoo.ZOO), help="comma-separated zoo names")
    p.add_argument("--exporter", default=",".join((*zoo.EXPORTERS, "ort-fused")),
                   help="torchscript, dynamo, ort-fused (TorchScript + onnxruntime's BERT "
                        f"fusion, for {', '.join(zoo.ORT_FUSED)} only)")
    p.add_argument("--no-prune", action="store_true", help="analysis only")
    p.add_argument("--output", help="write the table (markdown) here")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    outcomes = []
    print(HEADER, end="", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for form in forms(args.arch.split(","), args.exporter.split(",")):
            outcomes.append(survey(form, Path(tmp), prune=not args.no_prune))
            print(outcomes[-1].row(), flush=True)
    if args.output:
        command = "python -m tools.survey_attention " + " ".join(argv if argv is not None
                                                                  else sys.argv[1:])
        Path(args.output).write_text(
            "# Attention survey: heads and neurons found per architecture and exporter\n\n"
            f"Written by `{command.strip()}` (issue 9; models: `models/zoo.py`, tiny random "
            f"configs, {zoo.LAYERS} layers, sequence {zoo.SEQ}). *attention*: "
            "`config._attn_implementation` as built (transformers' default, then eager where "
            "that differs). *declined*: the analysis' reasons without node names, with their "
            "count over the model. *head groups not declined*: groups with a head axis that "
            "became neither a block nor a declined structure, listed as the model width (what "
            "`analyze --verbose` calls 'end at the model width') or nowhere, with their "
            "barriers: the worst outcome, nothing tells the user that heads were missed. "
            "Diagnoses per form: "
            "`docs/attention_diagnoses.md`. *MACs outside*: at batch 1, sequence "
            f"{zoo.SEQ}. *prune 0.7*: `optin_onnx.prune(..., flops=0.7, samples=8)` and its "
            "verification (max |slim - masked dense|).\n\n" + table(outcomes))


if __name__ == "__main__":
    main()
