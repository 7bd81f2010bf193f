"""Every knob of :func:`~optin_onnx.prune`, defined once: its type, default, CLI flag, help text
and bounds sit on the field itself, so ``optin-onnx prune``'s parser (:func:`add_flags`), the
checks (:func:`optin_onnx.validate.check_options`, run by ``__post_init__``) and the API cannot
drift apart. A new option is one field here, with its :func:`option` spec.

Closed choices are ``Literal`` types; their arguments are the CLI's ``choices`` and what the check
accepts. The object is frozen: a variant is made with :func:`dataclasses.replace` (which checks it
again), never by changing the caller's object.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from optin_onnx.errors import OptinError
from optin_onnx.io import CALIBRATION_LIMIT_BYTES
from optin_onnx.validate import (check_flops, check_latency_cases, check_number, check_options,
                                 check_output_names)

#: Importance criteria; the registry :data:`optin_onnx.scoring.importance.IMPORTANCES` holds one
#: class per name (a test keeps both lists equal).
Method = Literal["optin", "local", "magnitude", "random"]
Prune = Literal["heads", "neurons", "both"]
FeatureKind = Literal["auto", "ffn", "residual-ln", "blocks"]
Teacher = Literal["dense", "current"]
Simplify = Literal["auto", "on", "off"]
Provider = Literal["cpu", "cuda"]
#: Where scoring runs its candidate batches (optin_onnx.scoring.executors).
Executor = Literal["local", "processes", "ray"]
#: Corrections of the kept weights (:func:`optin_onnx.reconstruct.correct`).
Reconstruct = Literal["none", "scales", "refit"]
#: How units are chosen within a block once the search has fixed its count
#: (:mod:`optin_onnx.reconstruct.choose`).
Within = Literal["scores", "refit"]

#: onnxruntime execution providers behind each ``--provider`` (CPU is the fallback for any op the
#: GPU provider lacks).
PROVIDERS: dict[str, list[str]] = {"cpu": ["CPUExecutionProvider"],
                                   "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass(frozen=True)
class Spec:
    """How one option is spelled and checked.

    ``flag`` names the option in errors too (also for API-only options, where it is the field's
    name); ``aliases`` are older spellings the parser still accepts without listing them.
    ``lowest``/``inclusive`` bound a number; ``check`` replaces the generic checks where a field
    needs its own. ``to_cli`` turns the field's default into what the parser shows and parses,
    ``from_cli`` turns the parsed value back into the field's (``--max-calib-gib`` is GiB on the
    command line, bytes in the object); ``parse`` is the parser's ``type`` where the field's own
    type cannot parse a word. ``const``: what the flag alone, without a value, means (the
    value is then optional). ``off``: (flag, value), a second flag that sets the field to that
    value (``--no-reconstruct`` for ``--reconstruct none``)."""

    flag: str
    help: str = ""
    aliases: tuple[str, ...] = ()
    cli: bool = True
    lowest: float | None = None
    inclusive: bool = True
    check: Callable[[Any], None] | None = None
    parse: Callable[[str], Any] | None = None
    to_cli: Callable[[Any], Any] | None = None
    from_cli: Callable[[Any], Any] | None = None
    const: Any = None
    off: tuple[str, Any] | None = None


def option(default: Any, flag: str, help: str = "", **spec: Any) -> Any:
    """A dataclass field with its :class:`Spec` as metadata (see the module doc)."""
    return field(default=default, metadata={"spec": Spec(flag, help, **spec)})


def _parse_cases(text: str) -> list[tuple[int, int]]:
    """``--latency``: ``BATCHxSEQ[,BATCHxSEQ...]``; ``''`` is no case."""
    try:
        out = []
        for part in text.split(","):
            if part.strip():
                b, s = part.lower().split("x")
                out.append((int(b), int(s)))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ[,BATCHxSEQ...], got '{text}'")


def _parse_names(text: str) -> list[str]:
    """``--objective-output``: ``NAME[,NAME...]``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got '{text}'")
    return names


def _parse_group(text: str) -> int | None:
    """``--neuron-group``: a positive integer, or ``auto`` (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of neurons or 'auto', got '{text}'")


def _show_cases(cases: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{b}x{s}" for b, s in cases)


def gib_to_bytes(value: float) -> int:
    """``--max-calib-gib`` in bytes; non-finite or non-positive values are refused."""
    check_number("--max-calib-gib", value, False, 0.0, False)
    return max(1, int(value * 2**30))


@dataclass(frozen=True)
class PruneOptions:
    """Every knob of :func:`~optin_onnx.prune`; each with a ``Spec`` also a flag of
    ``optin-onnx prune``. Checked when made (see the module doc)."""

    flops: float = option(0.6, "--flops", "fraction of the MACs to keep, in (0, 1] "
                          "(default %(default)s)", check=check_flops)
    method: Method = option(
        "optin", "--method", "importance criterion: optin (trajectory), local (own layer only), "
        "magnitude (weight L2 norm), random (seeded by --seed) (default %(default)s)")
    seq_len: int | None = option(
        None, "--seq-len", "sequence length for counting FLOPs (default: mean real calibration "
        "length)", lowest=1)
    samples: int = option(32, "--samples", "calibration samples used for scoring; the rest are "
                          "held out for fidelity (default %(default)s)", lowest=1)
    prune: Prune = option("both", "--prune", "what to prune (default %(default)s)")
    lam: float = option(1.0, "--lam", "weight of the logit/output term", lowest=0.0)
    # Which graph outputs the output term compares (scoring.features.objective_outputs); the check
    # stage measures fidelity on the same ones.
    objective_outputs: Sequence[str] | None = option(
        None, "--objective-output", "graph outputs the output term compares and fidelity is "
        "measured on, NAME[,NAME...] (default: every output a pruned block can change)",
        check=check_output_names, parse=_parse_names)
    seed: int = option(0, "--seed", "seed for the sampled tokens", lowest=0)
    tokens: int = option(768, "--tokens", "tokens K in the MD Gram matrices", lowest=1)
    width_multiple: int = option(1, "--ffn-multiple", "keep FFN widths a multiple of N "
                                 "(default %(default)s)", aliases=("--round",), lowest=1)
    # Narrower SIMD / tensor-core tiles would make a model with fewer FLOPs run slower.
    channel_multiple: int = option(
        8, "--channel-multiple", "keep conv channel counts a multiple of N where a group has at "
        "least N (default %(default)s)", lowest=1)
    # Proxy-ordered groups: far less scoring time than exact scores, with held-out fidelity as
    # good on MiniLM (docs/RESULTS.md, "One-off measurements"). None (auto): the finest group
    # whose estimated scoring cost fits a budget of dense forwards (optin_onnx.scoring.budget).
    neuron_group: int | None = option(
        None, "--neuron-group", "score neurons (and conv channels) in groups of N adjacent by a "
        "local proxy (approximate; 1 = exact; default auto: the finest group of 8, 16, 32, ... "
        "whose estimated scoring time fits a fixed number of dense forward passes)", lowest=1,
        parse=_parse_group, to_cli=lambda group: "auto" if group is None else group)
    feature_kind: FeatureKind = option(
        "auto", "--feature", "trajectory feature: FFN outputs (post-LN, BERT), the LayerNorm'ed "
        "residual stream entering each later layer (pre-LN, ViT), the block outputs (CNNs), or "
        "auto (by graph; default)")
    # Rounds of score + search with budgets falling linearly to ``flops`` (optin_onnx.iterate).
    steps: int = option(
        1, "--rounds", "prune in N rounds, re-scoring the units left after each (budgets fall "
        "linearly to --flops; optin and local only; N times the scoring time; default "
        "%(default)s = one shot, as in the paper)", aliases=("--steps",), lowest=1)
    round_teacher: Teacher = option(
        "current", "--round-teacher", "with --rounds: what later rounds compare against, the "
        "previous round's pruned model (as if it were the dense one) or the input model (a score "
        "is the loss a unit adds; default %(default)s)")
    allow_block_removal: bool = option(False, "--allow-block-removal",
                                       "allow removing every head (or neuron) of a layer")
    # On by default: it helps, or at worst changes little, on every model measured and adds 6 % to
    # the demo model's end-to-end time (docs/DESIGN.md, "Why the defaults are what they are").
    reconstruct: Reconstruct = option(
        "refit", "--reconstruct", "correct the kept weights: refit (ridge refit of the layer "
        "reading each block's kept units against the dense residual stream, kept only where the "
        "held-out samples confirm it; the flag alone means refit), scales (one least-squares "
        "scale per kept unit) or none (default %(default)s)", const="refit",
        off=("--no-reconstruct", "none"))
    # Not the default: it helps the embedding model and EfficientNet, costs SVHN and the sentiment
    # classifier a little (docs/RESULTS.md, "Choosing units for the refit").
    within: Within = option(
        "scores", "--within", "which units each block keeps once the search has set how many: "
        "scores (the criterion's ranking) or refit (those whose loss the refit can best make up: "
        "structured OBS on the consumer's input; blocks with another kind of consumer keep the "
        "ranking; meant with --reconstruct refit) (default %(default)s)")
    provider: Provider = option("cpu", "--provider", "onnxruntime execution provider "
                                "(default %(default)s)")
    executor: Executor = option(
        "local", "--executor", "where scoring runs its candidate batches: this process, a pool of "
        "local processes, or a Ray cluster (pip install 'optin-onnx[distributed]'); the scores "
        "are the same (default %(default)s)")
    workers: int | None = option(
        None, "--workers", "processes or Ray tasks at once (default: one per core, or per CPU of "
        "the Ray cluster)", lowest=1)
    ray_address: str | None = option(
        None, "--ray-address", "the Ray cluster to use, as ray.init takes it (default: start one "
        "here)")
    # Chunk sizes are chosen to fit it and scoring refuses to start when its dense cache cannot
    # (calibrate.chunking, calibrate.check_cache_fits).
    max_memory_gib: float | None = option(
        None, "--max-memory-gib", "scoring's memory limit: calibration chunks and candidates per "
        "run are sized to it, and scoring refuses to start if its cached activations cannot fit "
        "(default: no limit)", lowest=0.0, inclusive=False)
    # Constant Reshape targets where provably equivalent (fewer nodes).
    canonicalize: bool = option(True, "--no-canonicalize",
                                "keep run-time Reshape targets as exported")
    simplify: Simplify = option(
        "auto", "--simplify", "onnxsim on the result: auto keeps it only if onnxruntime runs it "
        "at least as fast (default %(default)s)")
    tolerance: float = option(
        1e-4, "--tolerance", "max |slim - masked dense| / max(1, max |masked dense|), per output, "
        "accepted by the verify stage: absolute for outputs within [-1, 1], relative above "
        "(default %(default)g)", lowest=0.0)
    latency_cases: Sequence[tuple[int, int]] = option(
        ((1, 128), (32, 128)), "--latency", "latency cases BATCHxSEQ,... ('' to skip; default "
        "%(default)s)", check=check_latency_cases, parse=_parse_cases, to_cli=_show_cases)
    latency_seconds: float = option(8.0, "--latency-seconds", "time budget of each latency "
                                    "measurement (default %(default)g)", lowest=0.0,
                                    inclusive=False)
    # The fastest per candidate of the sizes measured (docs/RESULTS.md, "One-off measurements").
    candidates_per_run: int = option(4, "candidates_per_run", cli=False, lowest=1)
    chunk_size: int = option(16, "chunk_size", cli=False, lowest=1)
    # Calibration arrays may declare at most this many bytes once inflated (io.load_calibration).
    max_calib_bytes: int = option(
        CALIBRATION_LIMIT_BYTES, "--max-calib-gib", "refuse a calibration file whose arrays "
        "declare more than this many GiB once inflated (default %(default)g)", lowest=1,
        parse=float, to_cli=lambda b: b / 2**30, from_cli=gib_to_bytes)

    def __post_init__(self) -> None:
        check_options(self, specs(), choices())
        # Pairs and names as given (lists from the parser, tuples from the API), stored immutable.
        object.__setattr__(self, "latency_cases", tuple(tuple(c) for c in self.latency_cases))
        if self.objective_outputs is not None:
            object.__setattr__(self, "objective_outputs", tuple(self.objective_outputs))


def specs() -> dict[str, tuple[Spec, Any]]:
    """{field: (its spec, its resolved type)}, in declaration order."""
    hints = get_type_hints(PruneOptions)
    return {f.name: (f.metadata["spec"], hints[f.name]) for f in dataclasses.fields(PruneOptions)}


def choices() -> dict[str, tuple[str, ...]]:
    """{field: the values it accepts} for every closed choice."""
    return {name: get_args(kind) for name, (_, kind) in specs().items()
            if get_origin(kind) is Literal}


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add the flags of ``names`` (default: every option with a flag) to ``parser``, each under
    its field's name; an alias is accepted but not listed in ``--help``."""
    defaults = PruneOptions()
    for name, (spec, kind) in specs().items():
        if not spec.cli or (names is not None and name not in names):
            continue
        default = getattr(defaults, name)
        shown = spec.to_cli(default) if spec.to_cli else default
        kwargs: dict[str, Any] = {"dest": name, "help": spec.help}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if get_origin(kind) is Literal:
                kwargs["choices"] = get_args(kind)
                base = str
            else:  # int | None parses as int
                base = next((t for t in get_args(kind) if t is not type(None)), kind)
            kwargs["type"] = spec.parse or base
            kwargs["default"] = shown
            if spec.const is not None:
                kwargs.update(nargs="?", const=spec.const)
            if "choices" not in kwargs:
                kwargs["metavar"] = spec.flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(spec.flag, **kwargs)
        if spec.off:
            parser.add_argument(spec.off[0], dest=name, action="store_const", const=spec.off[1],
                                help=f"same as {spec.flag} {spec.off[1]}")
        for alias in spec.aliases:
            parser.add_argument(alias, **{**kwargs, "help": argparse.SUPPRESS,
                                          "default": argparse.SUPPRESS})


def from_args(args: argparse.Namespace) -> PruneOptions:
    """The options a parsed command line asks for (flags not on the parser keep their
    defaults)."""
    values = {}
    for name, (spec, _) in specs().items():
        if spec.cli and hasattr(args, name):
            value = getattr(args, name)
            values[name] = spec.from_cli(value) if spec.from_cli else value
    return PruneOptions(**values)


def providers_for(name: str) -> list[str]:
    """onnxruntime's providers for ``--provider``; ``cuda`` needs an onnxruntime built with it."""
    if name == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OptinError("--provider cuda: this onnxruntime has no CUDA provider "
                             "(pip install optin-onnx[gpu])")
    return PROVIDERS[name]


__all__ = ["Executor", "FeatureKind", "Method", "PROVIDERS", "PruneOptions", "Prune", "Provider",
           "Reconstruct", "Simplify", "Spec", "Teacher", "add_flags", "choices", "from_args",
           "gib_to_bytes", "option", "providers_for", "specs"]
