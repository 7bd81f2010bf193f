"""``optin-onnx``: the command-line front end. ``prune``'s flags are made from
:class:`~optin_onnx.options.PruneOptions`' fields (:func:`~optin_onnx.options.add_flags`).

    optin-onnx analyze  MODEL.onnx [--calib CALIB.npz]
    optin-onnx prune    IN.onnx OUT.onnx --flops 0.6 --calib CALIB.npz [options]
    optin-onnx make-calib TEXTS.txt TOKENIZER_DIR OUT.npz [--model MODEL.onnx] [--max-length 128]
                          [--samples N]
    optin-onnx make-calib --images DIR --model MODEL.onnx OUT.npz [--samples N] [--size HxW]
                          [--mean m,m,m --std s,s,s] [--resize shorter|stretch] [--layout nchw|nhwc]

Errors in the input are printed as one line (``optin-onnx: error: ...``) with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from optin_onnx.errors import OptinError
from optin_onnx.guard import Terminated


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one ``optin-onnx: error:`` line every other error is (argparse prints
    the usage block first); subcommand parsers are made of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"optin-onnx: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from optin_onnx.options import add_flags

    p = _Parser(prog="optin-onnx", description="Retraining-free structured pruning of ONNX "
                "models with OPTIN trajectory scores.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="print the prunable structure of a model")
    a.add_argument("model")
    a.add_argument("--calib", help="calibration .npz (probe shapes from real inputs)")
    a.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for MACs (default: the calibration's mean real length, "
                        "else 128)")
    a.add_argument("--verbose", action="store_true",
                   help="also list the projections that end at the model width, with where")
    add_flags(a, ["max_calib_bytes"])

    r = sub.add_parser("prune", help="prune a model to a FLOPs budget")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--calib", required=True, help="calibration .npz: one array per graph input")
    add_flags(r)
    r.add_argument("--report", help="also write the report as JSON here")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("make-calib", help="build a calibration .npz from a text file or images",
                       usage="optin-onnx make-calib TEXTS.txt TOKENIZER_DIR OUT.npz [--model M] "
                             "[options]\n       optin-onnx make-calib --images DIR --model M "
                             "OUT.npz [options]")
    c.add_argument("paths", nargs="+", metavar="PATH",
                   help="TEXTS.txt (UTF-8, one text per line), TOKENIZER_DIR (with tokenizer.json) "
                        "and OUT.npz; with --images only OUT.npz")
    c.add_argument("--model", metavar="MODEL.onnx",
                   help="the ONNX model: write exactly its inputs, in its dtypes (for text: "
                        "position_ids and an empty key/value cache too; required with --images)")
    c.add_argument("--samples", type=int, default=None, metavar="N",
                   help="use the first N texts or images")
    c.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="text: tokens per text (default 128)")
    c.add_argument("--images", metavar="DIR",
                   help="build from the images in DIR and its sub-folders, sorted by path")
    c.add_argument("--size", metavar="HxW",
                   help="images: the input size, where the model's is symbolic")
    c.add_argument("--mean", metavar="M,M,M",
                   help="images: per-channel mean after scaling to [0, 1] (default ImageNet's for "
                        "RGB, 0 for grayscale); with --std")
    c.add_argument("--std", metavar="S,S,S",
                   help="images: per-channel std (default ImageNet's for RGB, 1 for grayscale); "
                        "with --mean")
    c.add_argument("--resize", choices=("shorter", "stretch"), default=None,
                   help="images: scale to cover the input and crop the centre (shorter, default) "
                        "or resize to it ignoring the aspect ratio (stretch)")
    c.add_argument("--layout", choices=("nchw", "nhwc"), default=None,
                   help="images: where the model's input does not tell (channels on axis 1 or 3)")
    return p


def _analyze(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from optin_onnx.calibrate import make_calibration
    from optin_onnx.flops import mac_model
    from optin_onnx.options import gib_to_bytes
    from optin_onnx.pipeline import analyze, as_calibration, as_model
    from optin_onnx.validate import check_number

    if args.seq_len is not None:
        check_number("--seq-len", args.seq_len, True, 1, True)
    limit = gib_to_bytes(args.max_calib_bytes)
    loaded = as_model(args.model)
    calib = as_calibration(loaded, args.calib, limit) if args.calib else None
    model, structure = analyze(loaded, calib)
    console = Console(width=max(100, Console().width))
    if not structure.blocks:
        console.print(f"[bold red]no prunable structure found[/] in {args.model}")
        for d in structure.declined:
            console.print(f"  declined {d.name}: {'; '.join(d.reasons)}")
        if not structure.declined:
            console.print("  (no MatMul/Gemm output is contracted by another weight: nothing to "
                          "slim without changing the model width)")
        raise SystemExit(1)
    from optin_onnx.probe import sequence_inputs

    seq_len = args.seq_len or (max(1, round(make_calibration(calib).mean_length)) if calib
                               else 128)
    macs = mac_model(model, structure, seq_len, like=calib)
    where = f"sequence {seq_len}" if sequence_inputs(model) else "its fixed input size"
    title = (f"{args.model}: {structure.n_layers} layers, MACs at batch 1, {where}: "
             f"{macs.total / 1e6:.1f} M")
    transformer = [b for b in structure.blocks if b.kind != "channels"]
    if transformer:
        t = Table(title=title)
        for col in ("layer", "block", "units", "unit size", "MACs / unit", "block MACs"):
            t.add_column(col, justify="right" if col not in ("block",) else "left")
        for b in transformer:
            size = f"{b.unit_size} (head dim)" if b.kind == "attention" else "1"
            t.add_row(str(b.layer), b.name, f"{b.n_units} {b.unit_name}", size,
                      f"{macs.unit[b.name] / 1e3:.1f} k",
                      f"{macs.unit[b.name] * b.n_units / 1e6:.2f} M")
        console.print(t)
    channels = [b for b in structure.blocks if b.kind == "channels"]
    if channels:
        console.print(_channel_table(title if not transformer else "conv channel groups",
                                     channels, macs, model))
    console.print(f"MACs outside every block (embeddings, classifier heads, declined blocks): "
                  f"{macs.base / macs.total:.1%} of the MACs")
    for b in structure.blocks:
        if b.ports:
            console.print(f"{b.name}: KV cache {', '.join(p.name for p in b.ports)} shrinks "
                          f"with its {b.unit_name} (the pruned model's interface changes)")
    for d in structure.declined:
        console.print(f"[yellow]declined[/] {d.name}: {'; '.join(d.reasons)}")
    if structure.model_width:
        console.print(f"{len(structure.model_width)} projection(s) end at the model width (a "
                      f"residual add, a normalisation over the width, a graph output): not "
                      f"prunable units" + ("" if args.verbose else "; --verbose lists them"))
    if args.verbose:
        for d in structure.model_width:
            console.print(f"  model width {d.name}: {'; '.join(dict.fromkeys(d.reasons))}")


def _names(names: list[str], most: int = 2) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" +{len(names) - most}" if len(names) > most else "")


def _channel_table(title: str, blocks, macs, model):
    """One row per channel group: who writes it, who reads it, what else it ties, and the MACs
    that shrink with it (a conv between two groups counts in both rows)."""
    from rich.table import Table

    ops = {n.name: n.op_type for n in model.graph}
    t = Table(title=title)
    for col in ("block", "channels", "written by", "read by", "ties", "MACs scaling with it"):
        t.add_column(col, justify="right" if col in ("channels", "MACs scaling with it") else "left")
    for b in blocks:
        readers = list(dict.fromkeys(c.node for c in b.consumers))
        ties = []
        depthwise = [e for e in b.attr_edits if e.name == "group"]
        if depthwise:
            ties.append(f"{len(depthwise)} depthwise")
        if any(c.offset or c.span for c in b.consumers):
            ties.append("concat at " + ",".join(sorted({str(c.offset) for c in b.consumers})))
        if any(c.repeat > 1 for c in b.consumers):
            ties.append(f"flattened x{max(c.repeat for c in b.consumers)}")
        gates = [n for n in b.nodes if ops.get(n) == "Sigmoid"]
        if gates:
            ties.append(f"{len(gates)} sigmoid gate(s)")
        t.add_row(b.name, str(b.n_units), f"{len(b.sources)}: {_names(b.sources)}",
                  f"{len(readers)}: {_names(readers)}", "; ".join(ties) or "-",
                  f"{macs.unit[b.name] * b.n_units / 1e6:.2f} M")
    return t


def _prune(args) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from optin_onnx.options import from_args
    from optin_onnx.pipeline import prune
    from optin_onnx.report import print_report

    opt = from_args(args)
    if args.quiet:
        result = prune(args.input, args.calib, opt, output=args.output, report_path=args.report)
    else:
        with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("score", total=None)
            result = prune(args.input, args.calib, opt, output=args.output, report_path=args.report,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    print_report(result.report)


#: make-calib's options that apply only to images.
_IMAGE_FLAGS = ("size", "mean", "std", "resize", "layout")


def _make_calib(args) -> None:
    """Text (BERT-style arrays, or exactly the model's inputs with --model) or, with --images, one
    image batch laid out for the model's image input; see the module doc for the forms."""
    from optin_onnx.validate import check_number

    if args.samples is not None:
        check_number("--samples", args.samples, True, 1, True)
    if args.images is None:
        given = [f"--{flag}" for flag in _IMAGE_FLAGS if getattr(args, flag) is not None]
        if given:
            raise OptinError(f"make-calib {given[0]} applies to --images only")
        if len(args.paths) != 3:
            raise OptinError(f"make-calib takes TEXTS.txt TOKENIZER_DIR OUT.npz (or --images DIR"
                             f" --model MODEL.onnx OUT.npz), got {len(args.paths)} path(s)")
        _make_text_calib(args, *args.paths)
    else:
        if args.max_length is not None:
            raise OptinError("make-calib --max-length applies to text, not to --images")
        if args.model is None:
            raise OptinError("make-calib --images needs --model MODEL.onnx: the layout, size and"
                             " dtype of the arrays come from the model's input")
        if len(args.paths) != 1:
            raise OptinError(f"make-calib --images DIR takes one path, OUT.npz, got"
                             f" {len(args.paths)}")
        _make_image_calib(args, args.paths[0])


def _make_text_calib(args, texts_path: str, tokenizer_dir: str, output: str) -> None:
    from optin_onnx.calibdata import (TOKENIZER_FILES, encode_for_model, read_texts, tokenize,
                                      write_calibration)
    from optin_onnx.guard import refuse_unsafe_writes
    from optin_onnx.io import read_model

    tokenizer = [("tokenizer file", os.path.join(tokenizer_dir, name)) for name in TOKENIZER_FILES]
    refuse_unsafe_writes([("output path", output)],
                         [("texts file", texts_path), ("model file", args.model), *tokenizer],
                         create_folders=True)
    texts = read_texts(texts_path)
    if args.samples is not None:
        texts = texts[:args.samples]
    max_length = 128 if args.max_length is None else args.max_length
    if args.model is None:
        arrays, note = tokenize(texts, tokenizer_dir, max_length)
        notes = [note] if note else []
    else:
        arrays, notes = encode_for_model(texts, tokenizer_dir, read_model(args.model), max_length)
    for note in notes:
        print(note)
    write_calibration(arrays, output)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"wrote {output}: {shapes}")


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptinError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _make_image_calib(args, output: str) -> None:
    from optin_onnx.calibdata import write_calibration
    from optin_onnx.guard import refuse_unsafe_writes
    from optin_onnx.imagecalib import default_normalisation, encode_images, find_images, image_input
    from optin_onnx.io import read_model

    size = None
    if args.size is not None:
        parts = args.size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise OptinError(f"--size takes HxW in pixels (e.g. 224x224), got {args.size!r}")
        size = (int(parts[0]), int(parts[1]))
    if (args.mean is None) != (args.std is None):
        raise OptinError("give --mean and --std together (each defaults only with the other)")
    images, skipped = find_images(args.images)
    if args.samples is not None:
        images = images[:args.samples]
    refuse_unsafe_writes([("output path", output)],
                         [("model file", args.model), *[("image", p) for p in images]],
                         create_folders=True)
    spec = image_input(read_model(args.model), args.layout, size)
    if args.mean is None:
        mean, std = default_normalisation(spec.channels)
    else:
        mean, std = _floats("--mean", args.mean), _floats("--std", args.std)
    resize = args.resize or "shorter"
    array = encode_images(images, spec, mean, std, resize)
    print(f"read {len(images)} images from {args.images}"
          + (f" ({skipped} non-image files skipped)" if skipped else ""))
    write_calibration({spec.name: array}, output)
    print(f"wrote {output}: {spec.name} {tuple(array.shape)} {array.dtype} "
          f"({spec.layout.upper()}, {spec.size[0]}x{spec.size[1]}, resize {resize}, "
          f"mean {','.join(f'{m:g}' for m in mean)}, std {','.join(f'{s:g}' for s in std)})")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like SIGINT while a command runs, so every ``finally`` and
    temporary-file cleanup on the way runs (the default handlers kill the process on the spot,
    leaving a hidden temporary copy of the model next to OUT). Signal handlers can only be set
    from the main thread; elsewhere the defaults stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _terminate)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _quiet_onnxruntime() -> None:
    """Nothing but fatal errors from onnxruntime's own logger: its coloured warnings (an unused
    initializer, a declared shape it overrides) and error lines are printed by sessions not built
    by this package (onnxsim's), ahead of the one line the CLI promises; every failure still
    surfaces as an exception, which is what the CLI reports."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("analyze", "prune"):
            _quiet_onnxruntime()
        with _terminate_like_interrupt():
            {"analyze": _analyze, "prune": _prune, "make-calib": _make_calib}[args.command](args)
    except OptinError as exc:
        print(f"optin-onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optin-onnx: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as exc:
        print(f"optin-onnx: terminated by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
